"""Adapting without forgetting: LoRA adapters (merge parity, save/load), FLYP, layer-wise decay, whole-model
WiSE-FT with retention, and train --init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipcraft
from clipcraft.errors import ClipcraftError
from clipcraft.finetune import FinetuneConfig, finetune, load_classifier
from conftest import write_colour_split

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    for split, count, seed in (("train", 6, 0), ("val", 3, 1), ("test", 3, 2)):
        write_colour_split(root / split, count, seed)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return clipcraft.create_model("tiny").save(tmp_path_factory.mktemp("model") / "tiny")


def _config(model_dir: Path, colours: Path, out: Path, **changes) -> FinetuneConfig:
    fields = dict(
        model=str(model_dir),
        train=str(colours / "train"),
        val=str(colours / "val"),
        test=str(colours / "test"),
        output_dir=str(out),
        epochs=2,
        batch_size=6,
        lr_tower=1e-3,
        lr_text=1e-3,
        lr_head=1e-2,
        warmup_steps=1,
        patience=0,
        alphas=(0.0, 0.5, 1.0),
        device="cpu",
        precision="fp32",
    )
    fields.update(changes)
    return FinetuneConfig.from_dict(fields)


def _embed(model, images) -> tuple[np.ndarray, np.ndarray]:
    return model.encode_images(images), model.encode_texts(["a red thing", "a photo of a blue square"])


def test_lora_merged_model_equals_the_adapter_model(tmp_path: Path) -> None:
    from clipcraft.finetune.lora import (
        LoraSettings,
        add_lora,
        has_lora,
        load_adapters,
        merge_lora,
        save_adapters,
    )

    torch.manual_seed(0)
    base = clipcraft.create_model("tiny").eval()
    initial = {k: v.clone() for k, v in base.state_dict().items()}
    settings = LoraSettings(rank=4, alpha=8.0, towers="both")
    trainable = add_lora(base, settings)
    assert 0 < trainable < sum(p.numel() for p in base.parameters())
    assert all(p.requires_grad == ("lora_" in n) for n, p in base.image_tower.named_parameters())
    with torch.no_grad():  # B starts at zero (the adapted model is the base); make the adapters do something
        for key, value in base.state_dict().items():
            if "lora_B" in key:
                value.normal_(0, 0.2)
    images = [Image.new("RGB", (32, 32), c) for c in [(200, 10, 10), (10, 10, 200)]]
    adapted = _embed(base, images)
    assert not np.allclose(adapted[0], clipcraft.create_model("tiny").encode_images(images), atol=1e-3)
    save_adapters(base, tmp_path / "adapters", settings)
    merge_lora(base)
    assert not has_lora(base) and set(base.state_dict()) == set(initial)
    merged = _embed(base, images)
    for a, b in zip(adapted, merged, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the saved adapters on a fresh copy of the initial model give the same model again
    fresh = clipcraft.create_model("tiny").eval()
    fresh.load_state_dict(initial)
    load_adapters(fresh, tmp_path / "adapters")
    for a, b in zip(adapted, _embed(fresh, images), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_layer_decay_scales_blocks_by_depth() -> None:
    from clipcraft.finetune.adapt import layer_scales

    torch.manual_seed(0)
    model = clipcraft.create_model("tiny")  # 2 ViT blocks, 2 BERT layers
    scales = layer_scales(model.image_tower, "image_tower", 0.5)
    assert scales["trunk.patch_embed.proj.weight"] == 0.5**3  # before the first block
    assert scales["trunk.blocks.0.attn.qkv.weight"] == 0.5**2
    assert scales["trunk.blocks.1.mlp.fc2.bias"] == 0.5
    assert scales["trunk.fc_norm.weight"] == 1.0  # after the last block
    text = layer_scales(model.text_tower, "text_tower", 0.5)
    assert text["model.embeddings.word_embeddings.weight"] == 0.5**3
    assert text["model.encoder.layer.1.output.dense.weight"] == 0.5
    assert set(layer_scales(model.image_tower, "image_tower", 1.0).values()) == {1.0}


def test_flyp_head_is_the_text_towers_class_embeddings_and_retention_is_reported(
    model_dir: Path, colours: Path, tmp_path: Path
) -> None:
    from clipcraft.evaluation.zeroshot import ZeroShotClassifier

    result = finetune(
        _config(model_dir, colours, tmp_path / "flyp", method="flyp", layer_decay=0.8, retention=str(colours))
    )
    summary = result.summary
    assert summary["method"] == "flyp"
    total = summary["total_params"]
    # both towers, both heads and the temperature train (the classifier head is derived, not trained)
    head_params = 3 * 16 + 3
    assert summary["trainable_params"] == total - head_params - 1  # and the unused sigmoid-loss bias
    classifier = load_classifier(result.output_dir)
    zeroshot = ZeroShotClassifier(classifier.model, classifier.classnames, classifier.templates)
    np.testing.assert_allclose(classifier.head.weight.detach().numpy(), zeroshot.weights, atol=1e-5)
    # the text side moved: FLYP trains it (the CE fine-tune never does)
    initial = clipcraft.load(model_dir)
    assert not np.allclose(initial.encode_texts(["red"]), classifier.model.encode_texts(["red"]), atol=1e-4)
    retention = summary["retention"]
    assert retention["initial"]["kind"] == "zeroshot_top1"
    initial_top1 = summary["test"]["zeroshot"]["top1"]  # the same test folder, the same initial model
    assert retention["initial"]["score"] == pytest.approx(initial_top1, abs=1e-6)
    assert retention["wise"]["kept"] == pytest.approx(
        retention["wise"]["score"] / retention["initial"]["score"]
    )


def test_lora_finetune_saves_adapters_that_rebuild_the_finetuned_model(
    model_dir: Path, colours: Path, tmp_path: Path
) -> None:
    from clipcraft.finetune.lora import load_adapters

    config = _config(model_dir, colours, tmp_path / "lora", lora_rank=2, alphas=(1.0,), lr_tower=1e-2)
    result = finetune(config)
    summary = result.summary
    assert summary["lora"]["rank"] == 2 and summary["trainable_params"] < summary["total_params"] / 4
    saved = clipcraft.load(result.output_dir)  # a plain model: the adapters are merged
    assert not any("lora_" in k for k in saved.state_dict())
    rebuilt = clipcraft.load(model_dir)
    load_adapters(rebuilt, result.output_dir / "adapters")
    images = sorted(str(p) for p in (colours / "test").rglob("*.png"))[:4]
    np.testing.assert_allclose(saved.encode_images(images), rebuilt.encode_images(images), atol=1e-5)
    if summary["best_epoch"] > 0:  # it trained: the tower changed
        assert not np.allclose(saved.encode_images(images), clipcraft.load(model_dir).encode_images(images))


def test_adaptation_config_is_checked_before_any_work(model_dir: Path, colours: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipcraftError, match="method"):
        finetune(_config(model_dir, colours, tmp_path / "a", method="sgd"))
    with pytest.raises(ClipcraftError, match="needs method=flyp"):
        finetune(_config(model_dir, colours, tmp_path / "b", lora_rank=2, lora_towers="both"))
    with pytest.raises(ClipcraftError, match="layer_decay"):
        finetune(_config(model_dir, colours, tmp_path / "c", layer_decay=0.0))
    assert not (tmp_path / "a").exists()


def test_finetune_cli_on_an_imported_model(colours: Path, tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    from clipcraft.cli import main
    from clipcraft.towers import byte_tokenizer

    torch.manual_seed(0)
    text = dict(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32, pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    hf = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer().save_pretrained(tmp_path / "hf")
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(tmp_path / "hf"), "--train", str(colours / "train"), "--val",
            str(colours / "val"), "--output-dir", str(out), "--device", "cpu", "--precision", "fp32",
            "epochs=1", "batch_size=6", "method=flyp", "lora_rank=2", "lora_towers=both", "alphas=[0,1]"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "flyp" and summary["lora"]["towers"] == "both"
    assert (out / "adapters" / "adapter_config.json").is_file()
    assert load_classifier(out).model.config.image.kind == "hf_clip"


def test_wise_keep_chooses_the_best_mixture_that_keeps_the_retention_on_its_validation_split(
    model_dir: Path, colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipcraft.finetune import adapt
    from clipcraft.finetune.wise import best_alpha

    splits: list[str | None] = []
    measure = adapt.measure_retention

    def spy(model, data, split, *args, **kwargs):
        splits.append(split)
        return measure(model, data, split, *args, **kwargs)

    monkeypatch.setattr(adapt, "measure_retention", spy)
    config = _config(
        model_dir, colours, tmp_path / "keep", method="flyp", alphas=(0.0, 0.25, 0.5, 0.75, 1.0),
        retention=str(colours), retention_split="test", retention_val_split="val", wise_keep=1.0,
    )  # fmt: skip
    summary = finetune(config).summary
    rows = summary["wise"]
    by_alpha = {r["alpha"]: r for r in rows}
    # every mixture scored on the validation split first; then initial, fine-tuned, chosen on the reported one
    assert splits == ["val"] * 5 + ["test"] * 3
    # alpha 0 is the initial model: its retention on the validation split is its zero-shot val top-1
    assert by_alpha[0.0]["retention_val"] == pytest.approx(summary["val"]["zeroshot"]["top1"], abs=1e-6)
    assert by_alpha[0.0]["retention_val_kept"] == 1.0
    kept = [r for r in rows if r["retention_val_kept"] >= 1.0]
    assert summary["alpha"] == best_alpha(kept)
    assert by_alpha[summary["alpha"]]["retention_val_kept"] >= 1.0
    for r in rows:  # every mixture was scored, not only the chosen one
        assert r["retention_val_kept"] == pytest.approx(r["retention_val"] / by_alpha[0.0]["retention_val"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"wise_keep": 0.9}, "needs retention=DATA"),
        ({"wise_keep": 1.5, "retention": "r"}, "wise_keep must be in (0, 1]"),
        ({"wise_keep": 0.9, "retention": "r", "retention_val_split": "test"}, "separate validation split"),
        ({"wise_keep": 0.9, "retention": "r", "alphas": (0.5, 1.0)}, "needs alpha 0"),
    ],
)
def test_wise_keep_refuses_what_cannot_work(
    model_dir: Path, colours: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    with pytest.raises(ClipcraftError, match=message.replace("(", r"\(").replace("]", r"\]")):
        _config(model_dir, colours, tmp_path / "x", **changes).check()
