"""Evaluation runners on generated data with the tiny model: parity with straightforward implementations,
skipped images counted, the embedding cache reused, worker decoding equal to in-process decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcraft import encoding
from clipcraft.encoding import EncodeSettings, encode_images
from clipcraft.errors import ClipcraftError, UnknownNameError
from clipcraft.evaluation.runners import (
    CLASSIFICATION_KEYS,
    RETRIEVAL_KEYS,
    evaluate_linear_probe,
    evaluate_retrieval,
    evaluate_zeroshot,
    format_table,
    metric_keys,
    select_metrics,
)

CLASSES = ("cat", "dog", "red_car")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)


def _class_folder(root: Path, per_class: int, seed: int = 0, corrupt: bool = True) -> Path:
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            _image(root / name / f"{i:02d}.png", seed + 100 * c + i)
    if corrupt:
        (root / "dog" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


@pytest.fixture
def templates_file(tmp_path: Path) -> Path:
    path = tmp_path / "templates.txt"
    path.write_text("\n".join(TEMPLATES) + "\n")
    return path


@pytest.fixture
def captions_csv(tmp_path: Path) -> Path:
    rows = ["image,caption"]
    for i in range(5):
        _image(tmp_path / "caps" / f"{i}.png", 1000 + i)
        rows += [f"{i}.png,picture number {i}", f'{i}.png,"the {i}th image, with a comma"']
    (tmp_path / "caps" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows += ["broken.png,a broken file", "broken.png,still broken"]
    path = tmp_path / "caps" / "captions.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _plain_ranks(sim: np.ndarray, owner: np.ndarray) -> tuple[list[int], list[int]]:
    """Straightforward loops: ties count against the query."""
    i2t, t2i = [], []
    for i in range(sim.shape[0]):
        best = max(sim[i, j] for j in range(sim.shape[1]) if owner[j] == i)
        i2t.append(1 + sum(1 for j in range(sim.shape[1]) if owner[j] != i and sim[i, j] >= best))
    for j in range(sim.shape[1]):
        own = sim[owner[j], j]
        t2i.append(1 + sum(1 for i in range(sim.shape[0]) if i != owner[j] and sim[i, j] >= own))
    return i2t, t2i


def test_retrieval_matches_a_plain_implementation_and_skips_the_bad_image(tiny_model, captions_csv) -> None:
    result = evaluate_retrieval(tiny_model, captions_csv)
    assert set(RETRIEVAL_KEYS) <= set(result)
    assert (result["num_images"], result["num_captions"], result["num_skipped"]) == (5, 10, 1)
    assert result["skipped"][0]["path"].endswith("broken.png")

    folder = captions_csv.parent
    image_emb = tiny_model.encode_images([folder / f"{i}.png" for i in range(5)])  # (5, D)
    captions = [c for i in range(5) for c in (f"picture number {i}", f"the {i}th image, with a comma")]
    text_emb = tiny_model.encode_texts(captions)  # (10, D)
    i2t, t2i = _plain_ranks(image_emb @ text_emb.T, np.repeat(np.arange(5), 2))
    for k in (1, 5, 10):
        assert result[f"i2t_r{k}"] == pytest.approx(np.mean(np.array(i2t) <= k))
        assert result[f"t2i_r{k}"] == pytest.approx(np.mean(np.array(t2i) <= k))
    assert result["i2t_mean_rank"] == pytest.approx(np.mean(i2t))
    assert result["t2i_median_rank"] == pytest.approx(np.median(t2i))
    assert "i2t_r1" in format_table(result)


def test_retrieval_on_a_class_folder_says_it_has_no_captions(tiny_model, tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "cls", 1, corrupt=False)
    with pytest.raises(ClipcraftError, match="has no captions"):
        evaluate_retrieval(tiny_model, root)


def test_zeroshot_equals_plain_argmax_over_averaged_text_embeddings(
    tiny_model, tmp_path: Path, templates_file: Path
) -> None:
    root = _class_folder(tmp_path / "cls", 4)
    png = tmp_path / "cm.png"
    result = evaluate_zeroshot(tiny_model, root, templates_file=templates_file, confusion_png=png)
    assert set(CLASSIFICATION_KEYS) <= set(result)
    assert (result["num_images"], result["num_classes"], result["num_skipped"]) == (12, 3, 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Independent path: average the unit prompt embeddings per class, renormalize, argmax of the dot product.
    names = ["cat", "dog", "red car"]
    weights = []
    for name in names:
        t = tiny_model.encode_texts([tpl.replace("{}", name) for tpl in TEMPLATES])  # (T, D) unit rows
        mean = t.mean(axis=0)
        weights.append(mean / np.linalg.norm(mean))
    files = [root / c / f"{i:02d}.png" for c in CLASSES for i in range(4)]
    pred = (tiny_model.encode_images(files) @ np.stack(weights).T).argmax(axis=1)  # (12,)
    labels = np.repeat(np.arange(3), 4)
    assert result["top1"] == pytest.approx(np.mean(pred == labels))
    recalls = [np.mean(pred[labels == c] == c) for c in range(3)]
    assert result["mean_per_class_recall"] == pytest.approx(np.mean(recalls))
    assert result["per_class_recall"]["red car"] == pytest.approx(recalls[2])
    assert result["top5"] == 1.0  # 3 classes: every image is a top-5 hit


def test_second_run_reuses_cached_embeddings(
    tiny_model, tmp_path: Path, templates_file: Path, captions_csv: Path, monkeypatch
) -> None:
    root = _class_folder(tmp_path / "cls", 2)
    cache = {"cache_dir": str(tmp_path / "cache")}
    first_zs = evaluate_zeroshot(tiny_model, root, templates_file=templates_file, **cache)
    first_rt = evaluate_retrieval(tiny_model, captions_csv, **cache)
    assert first_zs["cache"]["misses"] == 2 and first_rt["cache"]["misses"] == 2  # images, then texts

    calls = {"images": 0, "texts": 0}
    real_images, real_texts = encoding.encode_pixels, encoding._encode_tokens

    def count_images(*args, **kwargs):
        calls["images"] += 1
        return real_images(*args, **kwargs)

    def count_texts(*args, **kwargs):
        calls["texts"] += 1
        return real_texts(*args, **kwargs)

    monkeypatch.setattr(encoding, "encode_pixels", count_images)
    monkeypatch.setattr(encoding, "_encode_tokens", count_texts)
    second_zs = evaluate_zeroshot(tiny_model, root, templates_file=templates_file, **cache)
    second_rt = evaluate_retrieval(tiny_model, captions_csv, **cache)
    assert calls == {"images": 0, "texts": 0}
    assert second_zs["cache"]["hits"] == 2 and second_rt["cache"]["hits"] == 2
    for key in (*CLASSIFICATION_KEYS, "num_skipped"):
        assert second_zs[key] == first_zs[key]
    for key in (*RETRIEVAL_KEYS, "num_skipped"):
        assert second_rt[key] == first_rt[key]

    # A changed file, or another output kind, misses the cache.
    _image(root / "cat" / "00.png", seed=999)
    evaluate_zeroshot(tiny_model, root, templates_file=templates_file, **cache)
    assert calls["images"] == 1


def test_worker_processes_give_the_same_embeddings_and_skips(tiny_model, tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "cls", 3)
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file())
    inline = encode_images(tiny_model, paths, EncodeSettings(workers=0, batch_size=4))
    pooled = encode_images(tiny_model, paths, EncodeSettings(workers=2, batch_size=4))
    np.testing.assert_allclose(pooled.vectors, inline.vectors, rtol=1e-5, atol=1e-6)
    assert pooled.kept.tolist() == inline.kept.tolist() and len(inline.kept) == 9
    assert (
        [bad.where for bad in pooled.failed]
        == [bad.where for bad in inline.failed]
        == [str(root / "dog" / "zz_corrupt.jpg")]
    )
    # The same images through the model's own encode_images: the runner path adds nothing.
    direct = tiny_model.encode_images([paths[i] for i in inline.kept])
    np.testing.assert_allclose(inline.vectors, direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("features", ["post", "pre"])
def test_linear_probe_on_train_and_test_folders(tiny_model, tmp_path: Path, features: str) -> None:
    pytest.importorskip("sklearn")
    train = _class_folder(tmp_path / "train", 6, seed=0, corrupt=False)
    test = _class_folder(tmp_path / "test", 3, seed=50)
    result = evaluate_linear_probe(tiny_model, train, test, features=features, l2_grid=(1e-3, 1e-1))
    assert set(CLASSIFICATION_KEYS) <= set(result)
    assert (result["num_train"], result["num_images"], result["num_skipped"]) == (18, 9, 1)
    width = tiny_model.embed_dim if features == "post" else tiny_model.image_tower.num_features
    assert result["feature_dim"] == width
    assert 0.0 <= result["top1"] <= 1.0 and result["l2"] > 0


def test_linear_probe_rejects_test_classes_missing_from_training(tiny_model, tmp_path: Path) -> None:
    train = _class_folder(tmp_path / "train", 2, corrupt=False)
    test = _class_folder(tmp_path / "test", 1, corrupt=False)
    _image(test / "horse" / "0.png", 7)
    with pytest.raises(ClipcraftError, match="not in the training data"):
        evaluate_linear_probe(tiny_model, train, test)
    with pytest.raises(UnknownNameError, match="Known: post, pre"):
        evaluate_linear_probe(tiny_model, train, train, features="mid")


def test_unknown_metric_and_task_names() -> None:
    assert select_metrics("retrieval", None) == RETRIEVAL_KEYS
    assert select_metrics("zeroshot", ["top1"]) == ("top1",)
    with pytest.raises(UnknownNameError, match="Did you mean 'top1'"):
        select_metrics("zeroshot", ["top_1"])
    with pytest.raises(UnknownNameError, match="Unknown evaluation 'retreival'"):
        metric_keys("retreival")


@pytest.mark.parametrize("native_bf16", [False, True])
def test_one_precision_for_images_and_texts_fp32_by_default_on_any_cpu(
    tiny_model,
    tmp_path: Path,
    templates_file: Path,
    captions_csv: Path,
    monkeypatch,
    native_bf16: bool,
    precisions_seen: list[str],
) -> None:
    """The hardware probe patched both ways: the default is fp32 everywhere; ``auto`` follows the hardware,
    and images and prompts/captions of one evaluation always run in the same precision."""
    monkeypatch.setattr("clipcraft.precision.cpu_has_native_bf16", lambda: native_bf16)
    seen = precisions_seen
    root = _class_folder(tmp_path / "cls", 2)
    default = evaluate_retrieval(tiny_model, captions_csv)
    assert default["precision"] == "fp32" and set(seen) == {"image:fp32", "text:fp32"}
    seen.clear()
    auto = evaluate_zeroshot(tiny_model, root, templates_file=templates_file, precision="auto")
    expected = "bf16" if native_bf16 else "fp32"
    assert auto["precision"] == expected and set(seen) == {f"image:{expected}", f"text:{expected}"}
