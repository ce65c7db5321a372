"""Every face of clipcraft on a tiny imported model: eval, index build, serve, export onnx, train --init.

(``finetune`` on an imported model is in tests/test_adapt.py.) The model is a random transformers CLIPModel
saved with ``save_pretrained``; the commands take that directory as ``--model`` directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipcraft
from clipcraft.cli import main
from clipcraft.demo import write_scene_dataset


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from clipcraft.towers import byte_tokenizer

    torch.manual_seed(0)
    text = dict(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    out = tmp_path_factory.mktemp("hf") / "clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name in ("red", "blue"):
        (root / name).mkdir()
        for i in range(3):
            colour = (200, 30, 30) if name == "red" else (30, 30, 200)
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_eval_zeroshot_and_retrieval(hf_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "zs.json"
    assert (
        main(
            ["eval", "zeroshot", "--model", str(hf_dir), "--data", str(images), "--out", str(out), "--quiet"]
        )
        == 0
    )
    result = json.loads(out.read_text())
    model = clipcraft.load(hf_dir)
    clf = clipcraft.ZeroShotClassifier(model, ["blue", "red"])
    paths = sorted(str(p) for p in images.rglob("*.png"))
    labels, _ = clf.predict(paths)
    expected = np.mean([lab == Path(p).parent.name for lab, p in zip(labels, paths, strict=True)])
    assert result["num_images"] == 6 and result["top1"] == pytest.approx(expected)
    rows = ["image,caption"] + [f"{p},a {Path(p).parent.name} square" for p in paths]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    argv = [
        "eval",
        "retrieval",
        "--model",
        str(hf_dir),
        "--data",
        str(tmp_path / "pairs.csv"),
        "--out",
        str(out),
    ]
    assert main([*argv, "--quiet"]) == 0
    assert json.loads(out.read_text())["num_images"] == 6


def test_index_build_search_and_serve(hf_dir: Path, images: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from clipcraft.server.app import create_app

    index = tmp_path / "pics.index"
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                str(hf_dir),
                "--images",
                str(images),
                "--out",
                str(index),
                "--quiet",
            ]
        )
        == 0
    )
    loaded = clipcraft.Index.load(index)
    hits = loaded.search_image(str(images / "red" / "0.png"), k=1)
    assert Path(hits[0][0]).name == "0.png" and Path(hits[0][0]).parent.name == "red"  # finds itself
    with TestClient(create_app(index)) as client:
        response = client.get("/api/search/text", params={"q": "a red square", "k": 3})
        assert response.status_code == 200
        rows = response.json()["results"]
        expected = loaded.search_text("a red square", k=3)
        assert [r["score"] for r in rows] == pytest.approx([score for _, score in expected], abs=1e-5)


def test_export_onnx_of_an_imported_model(hf_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert (
        main(["export", "onnx", "--model", str(hf_dir), "--out", str(out)]) == 0
    )  # verified against clipcraft
    assert (out / "image.onnx").is_file() and (out / "text.onnx").is_file()


def test_train_init_starts_from_the_imported_weights(hf_dir: Path, tmp_path: Path) -> None:
    from clipcraft.train import train
    from clipcraft.train.config import TrainConfig

    data = write_scene_dataset(tmp_path / "scenes", train=8, val=4, test=4, seed=0)
    config = {"init": str(hf_dir), "data": str(data), "output_dir": str(tmp_path / "run"), "epochs": 1,
              "batch_size": 4, "lr_image_tower": 0.0, "lr_text_tower": 0.0, "lr_heads": 0.0, "warmup_steps": 0,
              "precision": "fp32", "example_sheet": False, "num_workers": 0}  # fmt: skip
    result = train(TrainConfig.from_dict(config))
    trained, imported = clipcraft.load(result.last_model), clipcraft.load(hf_dir)
    # learning rate 0: the run's model is the imported one, not a fresh random model of the same shape
    captions = ["a red circle", "a small blue square"]
    np.testing.assert_allclose(trained.encode_texts(captions), imported.encode_texts(captions), atol=1e-6)
    assert trained.config.image.kind == "hf_clip"
    assert "Imported from transformers" in (result.last_model / "README.md").read_text()
    assert main(["train", "--init", str(hf_dir), "--data", str(data), "--output-dir", str(tmp_path / "cli"),
                 "epochs=1", "batch_size=4", "precision=fp32", "example_sheet=false", "max_steps=1"]) == 0  # fmt: skip
