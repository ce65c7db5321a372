"""bench/sweep_recipe.py, the GPU recipe sweep: its batched crop and caption lookup against simple references,
and one tiny setting trained end to end on the CPU from a pack written here."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def _load_sweep():
    path = Path(__file__).parents[1] / "sweep_recipe.py"
    spec = importlib.util.spec_from_file_location("sweep_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


def _plain_recalls(image: np.ndarray, text: np.ndarray, text_to_image: np.ndarray) -> dict[str, float]:
    """Recall@1/5/10 both ways by counting, for unit embeddings image (N, D) and text (M, D): a query's rank
    is 1 + the number of candidates scored above its best match."""
    sim = image @ text.T  # (N, M)
    i2t = [1 + int((sim[i] > sim[i][text_to_image == i].max()).sum()) for i in range(len(image))]
    t2i = [1 + int((sim[:, j] > sim[text_to_image[j], j]).sum()) for j in range(len(text))]
    return {
        f"{d}_r{k}": float(np.mean(np.array(r) <= k))
        for d, r in (("i2t", i2t), ("t2i", t2i))
        for k in (1, 5, 10)
    }


class _Spy:
    """Wraps clipcraft.create_model to keep the model the sweep trains (train_one returns numbers only)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import clipcraft

        self.models: list = []
        create = clipcraft.create_model

        def spy(*args, **kwargs):
            self.models.append(create(*args, **kwargs))
            return self.models[-1]

        monkeypatch.setattr(clipcraft, "create_model", spy)


def _embed_val(model, val, img_size: int, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    mean = torch.tensor(meta["preprocess"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["preprocess"]["std"]).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        pixels = (sweep.eval_crop(val.images, img_size, meta["preprocess"]["crop_pct"]) - mean) / std
        image = model.embed_image_features(model.image_tower(pixels)).numpy()
        text = model.embed_text_features(val.text).numpy()
    return image, text


def test_crop_keeps_values_and_orientation_and_flip_mirrors_it() -> None:
    ramp = torch.arange(112, dtype=torch.float32).repeat(112, 1) * 2  # value grows left to right
    images = ramp.round().to(torch.uint8).expand(5, 3, 112, 112).contiguous()
    a = sweep.random_resized_crop(images, 48, (0.3, 1.0), 0.0, torch.Generator().manual_seed(1))
    b = sweep.random_resized_crop(images, 48, (0.3, 1.0), 1.0, torch.Generator().manual_seed(1))
    assert a.shape == (5, 3, 48, 48) and a.min() >= 0.0 and a.max() <= 1.0
    assert (a[..., 1:] >= a[..., :-1] - 1e-6).all()  # not mirrored, not transposed
    assert (a[:, :, 1:, :] - a[:, :, :-1, :]).abs().max() < 1e-5  # rows identical: no vertical change
    assert torch.allclose(b, a.flip(-1), atol=1e-5)  # the same crop, mirrored
    flat = torch.full((2, 3, 112, 112), 77, dtype=torch.uint8)
    out = sweep.random_resized_crop(flat, 32, (0.5, 1.0), 0.5, torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.full_like(out, 77 / 255), atol=1e-6)


def test_eval_crop_matches_torchvision_resize_and_center_crop() -> None:
    from torchvision.transforms.v2 import functional as TF

    images = torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8)
    ours = sweep.eval_crop(images, 96, 0.9)
    size = int(96 / 0.9)
    ref = TF.center_crop(
        TF.resize(
            images.float() / 255, [size, size], antialias=True, interpolation=TF.InterpolationMode.BICUBIC
        ),
        [96, 96],
    )
    assert ours.shape == (3, 3, 96, 96)
    assert torch.allclose(ours, ref.clamp(0, 1), atol=1e-5)


def _write_split(root: Path, split: str, counts: list[int], dim: int = 384, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in counts:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, format="JPEG")
        blobs.append(buf.getvalue())
    (root / f"{split}-images.bin").write_bytes(b"".join(blobs))
    np.save(root / f"{split}-image-offsets.npy", np.cumsum([0] + [len(b) for b in blobs]))
    feats = rng.standard_normal((sum(counts), dim)).astype(np.float32)
    scale = np.abs(feats).max(axis=1, keepdims=True) / 127
    np.save(root / f"{split}-text-int8.npy", np.round(feats / scale).astype(np.int8))
    np.save(root / f"{split}-text-scale.npy", scale.astype(np.float32))
    np.save(root / f"{split}-caption-counts.npy", np.array(counts))


def test_caption_rows_wrap_within_each_image(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", [2, 3])
    split = sweep.Split(tmp_path, "train", torch.device("cpu"))
    assert split.images.shape == (2, 3, 112, 112) and split.text.shape == (5, 384)
    rows = split.caption_rows(torch.tensor([1, 0]), torch.tensor([2, 1]), 3)
    assert rows.tolist() == [2 + 2, 2 + 0, 2 + 1, 0 + 1, 0 + 0, 0 + 1]  # image 1 first, then image 0
    assert split.text_to_image.tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_one_tiny_setting_trains_and_validates(tmp_path: Path, loss: str, monkeypatch) -> None:
    _write_split(tmp_path, "train", [5] * 8, seed=1)
    _write_split(tmp_path, "val", [5] * 4, seed=2)
    meta = {"preprocess": {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cpu = torch.device("cpu")
    train, val = sweep.Split(tmp_path, "train", cpu), sweep.Split(tmp_path, "val", cpu)
    setting = {"epochs": 2, "img_size": 32, "batch_size": 4, "warmup_steps": 1, "loss": loss}
    spy = _Spy(monkeypatch)
    result = sweep.train_one(setting, train, val, meta, cpu)
    assert result["stopped_at_epoch"] is None and [c["epoch"] for c in result["curve"]] == [2]
    assert np.isfinite(result["curve"][-1]["loss"])
    # the reported recalls are the trained model's, recomputed here by counting
    plain = _plain_recalls(*_embed_val(spy.models[-1], val, 32, meta), val.text_to_image)
    final = result["final"]
    assert {k: final[k] for k in plain} == pytest.approx(plain, abs=6e-5)  # reported to 4 decimals
    assert final["recall_mean"] == pytest.approx(np.mean(list(plain.values())), abs=6e-5)
    stopped = sweep.train_one({**setting, "epochs": 3}, train, val, meta, cpu, stop_at=0.0)
    assert stopped["stopped_at_epoch"] == 1 and [c["epoch"] for c in stopped["curve"]] == [1]


def _write_cifar(root: Path, classes: int, templates: int, n: int, dim: int = 384) -> dict:
    rng = np.random.default_rng(3)
    np.save(root / "cifar-images.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    np.save(root / "cifar-labels.npy", np.arange(n) % classes)
    prompts = rng.standard_normal((classes * templates, dim)).astype(np.float32)
    np.save(root / "cifar-prompt-features.npy", prompts)
    names = [f"class{c}" for c in range(classes)]
    return {"classnames": names, "templates": templates, "images": n}


def test_zeroshot_matches_the_library_zero_shot_head(tmp_path: Path) -> None:
    """zeroshot_top1 equals top-1 from clipcraft's build_classifier_weights over the same prompt features."""
    import clipcraft
    from clipcraft.evaluation.zeroshot import build_classifier_weights

    classes, templates, n = 4, 3, 40
    torch.manual_seed(0)
    model = clipcraft.create_model("tiny", overrides={"image.model_kwargs": {"img_size": 32}}).eval()
    info = _write_cifar(tmp_path, classes, templates, n, dim=model.text_head.proj.in_features)
    cifar = sweep.Cifar.open(tmp_path, {"cifar": info}, torch.device("cpu"))
    prompts = {
        f"{name} {t}": cifar.prompts[c * templates + t]
        for c, name in enumerate(info["classnames"])
        for t in range(templates)
    }

    def encode(batch: list[str]) -> np.ndarray:  # the text tower's features of each prompt, then the head
        with torch.no_grad():
            return model.embed_text_features(torch.stack([prompts[p] for p in batch])).numpy()

    weights = build_classifier_weights(encode, info["classnames"], [f"{{}} {t}" for t in range(templates)])
    mean = std = torch.full((1, 3, 1, 1), 0.5)
    with torch.no_grad():
        got = sweep.zeroshot_top1(model, cifar, 32, 0.9, mean, std)
        image = model.embed_image_features(
            model.image_tower((sweep.eval_crop(cifar.images, 32, 0.9) - 0.5) / 0.5)
        )
    expected = float(((image.numpy() @ weights.T).argmax(axis=1) == np.arange(n) % classes).mean())
    assert got == pytest.approx(expected, abs=1e-6) and 0 < expected < 1


def test_a_patch_dropout_setting_trains_and_reports_zero_shot(tmp_path: Path, monkeypatch) -> None:
    _write_split(tmp_path, "train", [5] * 8, seed=1)
    _write_split(tmp_path, "val", [5] * 4, seed=2)
    meta = {"preprocess": {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9}}
    meta["cifar"] = _write_cifar(tmp_path, 3, 2, 12)
    cpu = torch.device("cpu")
    train, val = sweep.Split(tmp_path, "train", cpu), sweep.Split(tmp_path, "val", cpu)
    setting = {"epochs": 1, "img_size": 32, "batch_size": 4, "warmup_steps": 1}
    setting["model_overrides"] = {sweep.PD: 0.5}
    spy = _Spy(monkeypatch)
    cifar = sweep.Cifar.open(tmp_path, meta, cpu)
    result = sweep.train_one(setting, train, val, meta, cpu, cifar=cifar)
    assert result["resolved"]["model_overrides"] == {sweep.PD: 0.5} and result["best_epoch"] == 1
    # zero-shot recomputed on the trained model (patch dropout is off in eval mode): the class head is the
    # normalised mean of each class's unit prompt embeddings, the prediction the most similar class
    model = spy.models[-1].eval()
    with torch.no_grad():
        prompts = model.embed_text_features(cifar.prompts).numpy().reshape(3, 2, -1)  # (C, T, D)
        pixels = (sweep.eval_crop(cifar.images, 32, 0.9) - 0.5) / 0.5
        image = model.embed_image_features(model.image_tower(pixels)).numpy()  # (N, D)
    head = prompts.mean(axis=1)
    head /= np.linalg.norm(head, axis=1, keepdims=True)
    top1 = float(((image @ head.T).argmax(axis=1) == cifar.labels.numpy()).mean())
    assert result["final"]["cifar_zeroshot"] == pytest.approx(top1, abs=6e-5)


def test_low_resolution_blurs_the_picked_images_only() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64)
    assert torch.equal(sweep.low_resolution(x, 0.0, 32, gen), x)
    out = sweep.low_resolution(x, 1.0, 32, gen)
    small = torch.nn.functional.avg_pool2d(x, 2)  # area resize by 2 = 2x2 means
    expected = torch.nn.functional.interpolate(small, size=(64, 64), mode="bicubic").clamp(0, 1)
    torch.testing.assert_close(out, expected)
    assert out.std() < x.std()  # detail gone


def _write_variants(root: Path, captions: int, variants: int, dim: int = 384) -> np.ndarray:
    feats = np.random.default_rng(7).standard_normal((variants, captions, dim)).astype(np.float32)
    scale = np.abs(feats).max(axis=2, keepdims=True) / 127
    np.save(root / "train-text-variants-int8.npy", np.round(feats / scale).astype(np.int8))
    np.save(root / "train-text-variants-scale.npy", scale.astype(np.float32))
    return feats


def test_packed_caption_variants_are_the_features_of_the_augmented_captions(tmp_path: Path) -> None:
    import clipcraft
    from clipcraft.data.text_augment import caption_variant

    model = clipcraft.create_model("tiny").eval()
    captions = ["a dog runs on the grass by the river", "two children play with a red ball", "a cat"]
    info = sweep._pack_variants(model, captions, 2, 0.5, tmp_path)
    assert info == {"variants": 2, "strength": 0.5, "seed": 0}
    q = np.load(tmp_path / "train-text-variants-int8.npy").astype(np.float32)
    packed = q * np.load(tmp_path / "train-text-variants-scale.npy")  # (2, 3, F)
    for v in (1, 2):
        texts = [caption_variant(c, v, 0.5, seed=0) for c in captions]
        direct = sweep._text_features(model, texts)
        step = np.abs(direct).max(axis=1, keepdims=True) / 127  # int8 rounding: half a step at most
        assert np.all(np.abs(packed[v - 1] - direct) <= step / 2 + 1e-6)
    assert caption_variant(captions[0], 1, 0.5, seed=0) != captions[0]


def test_ssl_and_caption_variant_settings_train_and_validate(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", [5] * 8, seed=1)
    _write_split(tmp_path, "val", [5] * 4, seed=2)
    variants = _write_variants(tmp_path, 40, 2)
    meta = {"preprocess": {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9}}
    cpu = torch.device("cpu")
    train, val = sweep.Split(tmp_path, "train", cpu), sweep.Split(tmp_path, "val", cpu)
    assert train.versions.shape == (3, 40, 384) and torch.equal(train.versions[0], train.text)
    assert torch.allclose(train.versions[1:], torch.from_numpy(variants), atol=0.05)
    assert val.versions.shape == (1, 20, 384)  # variants are packed for training only
    base = {"epochs": 1, "img_size": 32, "batch_size": 4, "warmup_steps": 1}
    plain = sweep.train_one(base, train, val, meta, cpu)
    lever = {**base, "ssl_weight": 1.0, "ssl_hidden": 16, "ssl_dim": 8, "text_variants": 2}
    result = sweep.train_one(lever, train, val, meta, cpu)
    assert result["final"]["ssl_loss"] > 0 and "ssl_loss" not in plain["final"]
    assert result["final"]["loss"] != pytest.approx(plain["final"]["loss"], abs=1e-4)
    assert np.isfinite(result["final"]["recall_mean"])
    # without the packed variants a setting that asks for them stops with the fix
    with pytest.raises(SystemExit, match="--text-variants 3"):
        sweep.train_one({**base, "text_variants": 3}, train, val, meta, cpu)
