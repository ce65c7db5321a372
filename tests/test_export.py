"""ONNX export: both graphs run with ONNX Runtime alone and match clipcraft's own embeddings."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcraft import create_model, load
from clipcraft.cli import main
from clipcraft.errors import ClipcraftError
from clipcraft.export import export_onnx
from clipcraft.towers import ImageTower, TextTower

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (clipcraft[export])")
tokenizers = pytest.importorskip("tokenizers")

MIN_COSINE = 0.9999
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


# -- what a user without clipcraft would write, following preprocess.json ------------------------------------


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the test machine is shared
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def preprocess(image: Image.Image | Path, spec: dict) -> np.ndarray:
    """One image -> (3, H, W) float32 from preprocess.json's "image" section, with PIL and numpy only."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    _, height, width = spec["input_size"]
    short = spec["resize_shorter_side"]
    w, h = image.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # (w, h)
    image = image.resize(size, RESAMPLE[spec["interpolation"]])
    top, left = round((size[1] - height) / 2), round((size[0] - width) / 2)
    image = image.crop((left, top, left + width, top + height))
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    x = (x - np.array(spec["mean"], dtype=np.float32)) / np.array(spec["std"], dtype=np.float32)
    return x.transpose(2, 0, 1)  # (3, H, W)


def tokenize(out: Path, captions: list[str]) -> dict[str, np.ndarray]:
    """Captions -> the text graph's inputs, with the exported tokenizer.json alone."""
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    encoded = tok.encode_batch(captions)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check_parity(out: Path, model, images: list, caption_batches: list[list[str]], image_batches) -> None:
    """Both graphs, at the given batch sizes and caption batches, against encode_images / encode_texts."""
    meta = json.loads((out / "preprocess.json").read_text())
    image_graph, text_graph = session(out / "image.onnx"), session(out / "text.onnx")

    pixels = np.stack([preprocess(im, meta["image"]) for im in images])  # (N, 3, H, W)
    expected = model.encode_images(images)
    seen_batches = set()
    for size in image_batches:
        got = image_graph.run(None, {"pixel_values": pixels[:size]})[0]
        assert got.shape == (size, model.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the normalisation contract
        assert cosines(got, expected[:size]).min() >= MIN_COSINE
        seen_batches.add(size)
    assert len(seen_batches) >= 2

    lengths = set()
    for captions in caption_batches:
        inputs = tokenize(out, captions)
        ours = model.tokenize(captions)
        np.testing.assert_array_equal(inputs["input_ids"], ours["input_ids"].numpy())
        np.testing.assert_array_equal(inputs["attention_mask"], ours["attention_mask"].numpy())
        got = text_graph.run(None, inputs)[0]
        assert got.shape == (len(captions), model.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert cosines(got, model.encode_texts(captions)).min() >= MIN_COSINE
        lengths.add(inputs["input_ids"].shape)
    assert len(lengths) == len(caption_batches)  # different batch sizes and sequence lengths


# -- tiny model ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return create_model("tiny").save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def tiny_export(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model exported through the command line, from its saved directory."""
    out = tmp_path_factory.mktemp("exports") / "tiny-onnx"
    assert main(["export", "onnx", "--model", str(tiny_dir), "--out", str(out)]) == 0
    return out


def test_tiny_export_matches_clipcraft_at_two_batch_sizes_and_lengths(tiny_dir, tiny_export, rgb_images):
    model = load(tiny_dir)
    captions = [
        ["  A Dog on the grass "],  # surrounding whitespace is stripped, as clipcraft does
        ["two cats", "a red car parked outside a small shop", "x" * 200],  # the last one is truncated
    ]
    check_parity(tiny_export, model, rgb_images, captions, image_batches=(1, 5))
    # the sequence axis is dynamic up to max_length, and the truncated caption reaches it
    assert tokenize(tiny_export, captions[1])["input_ids"].shape[1] == model.config.text.max_length


def test_export_directory_describes_the_graphs(tiny_dir, tiny_export):
    model = load(tiny_dir)
    files = sorted(str(p.relative_to(tiny_export)) for p in tiny_export.rglob("*") if p.is_file())
    assert {"image.onnx", "text.onnx", "preprocess.json", "README.txt", "tokenizer/tokenizer.json"} <= set(
        files
    )
    assert sorted(p.name for p in tiny_export.parent.iterdir()) == ["tiny-onnx"]  # no temporary copies left

    meta = json.loads((tiny_export / "preprocess.json").read_text())
    p = model.config.image.preprocess
    assert meta["embed_dim"] == model.embed_dim == 16
    assert meta["image"]["input_size"] == list(p.input_size)
    assert meta["image"]["mean"] == list(p.mean) and meta["image"]["std"] == list(p.std)
    assert meta["image"]["interpolation"] == p.interpolation and meta["image"]["crop_pct"] == p.crop_pct
    assert meta["image"]["resize_shorter_side"] == math.floor(p.input_size[1] / p.crop_pct)
    assert meta["text"]["max_length"] == model.config.text.max_length
    assert meta["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()))

    # the graphs' declared inputs and outputs are the ones preprocess.json and README.txt name
    for kind in ("image", "text"):
        graph = session(tiny_export / meta["graphs"][kind]["file"])
        declared = meta["graphs"][kind]
        assert [(i.name, i.shape) for i in graph.get_inputs()] == [
            (t["name"], t["shape"]) for t in declared["inputs"]
        ]
        assert [(o.name, o.shape) for o in graph.get_outputs()] == [
            (t["name"], t["shape"]) for t in declared["outputs"]
        ]
    assert "L2-normalised" in (tiny_export / "README.txt").read_text()


def test_python_export_of_an_in_memory_model_replaces_an_earlier_export(tiny_export, tmp_path, rgb_images):
    earlier = tmp_path / "out"
    shutil.copytree(tiny_export, earlier)
    (earlier / "stale.txt").write_text("from an older export")
    torch.manual_seed(1)
    model = create_model("tiny", overrides={"head.kind": "linear", "embed_dim": 8}).train()

    report = export_onnx(model, earlier, overwrite=True)
    assert model.training  # the caller's mode comes back
    assert report.image_cosine >= MIN_COSINE and report.text_cosine >= MIN_COSINE
    assert report.embed_dim == 8 and "image.onnx" in report.files and "stale.txt" not in report.files
    assert not (earlier / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old copies left
    model.eval()
    check_parity(earlier, model, rgb_images[:3], [["a"], ["a dog", "two cats on a mat"]], (1, 3))


# -- bad input ----------------------------------------------------------------------------------------------


def _branchy_image_forward(self, images):
    if images.mean() > 0:  # Python control flow on a tensor value: no single graph for every input
        return self.trunk(images)
    return -self.trunk(images)


def _unconvertible_text_forward(self, input_ids, attention_mask):
    hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return torch.cummax(hidden, dim=1).values[:, -1]  # traces, but has no ONNX translation


@pytest.mark.parametrize(
    ("tower", "method", "message"),
    [
        (ImageTower, _branchy_image_forward, "image tower (vit_tiny_patch16_224) cannot be traced"),
        (TextTower, _unconvertible_text_forward, "text tower (clipcraft/tiny-bert) traced but could not"),
    ],
)
def test_a_tower_that_cannot_be_exported_fails_clearly_and_writes_nothing(
    tmp_path, monkeypatch, tower, method, message
):
    model = create_model("tiny").eval()
    monkeypatch.setattr(tower, "forward", method)
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory is a valid target and must stay empty
    with pytest.raises(ClipcraftError) as info:
        export_onnx(model, out)
    text = str(info.value)
    assert message in text and "nothing was written" in text.lower()
    assert len(text) < 1000  # the cause in a line or two, not the exporter's graph dump
    if tower is ImageTower:
        assert "images.mean() > 0" in text  # points at the offending line
    else:
        assert "cummax" in text
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_errors_for_a_missing_model_and_an_occupied_output(tiny_dir, tiny_export, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["export", "onnx", "--model", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"Model directory not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    args = ["export", "onnx", "--model", str(tiny_dir), "--out", str(occupied)]
    assert main(args) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 2  # never replaces something that is not an export
    assert "is not a clipcraft ONNX export" in capsys.readouterr().err
    assert (occupied / "notes.txt").read_text() == "mine"


# -- a real text tower on real images and captions ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.data
def test_minilm_export_matches_clipcraft_on_flickr8k(shared_data, minilm_dir, tmp_path):
    flickr = shared_data / "flickr8k"
    if not (flickr / "captions.txt").is_file():
        pytest.skip(f"Flickr8k captions not found under {flickr}")
    with open(flickr / "captions.txt", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_image: dict[str, str] = {}
    for row in rows:
        by_image.setdefault(row["image"], row["caption"])
        if len(by_image) == 4:
            break
    images = [flickr / "images" / name for name in by_image]
    captions = list(by_image.values())

    # real all-MiniLM-L6-v2 text tower; a small random ViT keeps the test fast (the image graph is the same code)
    torch.manual_seed(0)
    model = create_model("minilm-vit-tiny", overrides={"image.model_kwargs": {"img_size": 64, "depth": 2}})
    model_dir = model.save(tmp_path / "model")
    model = load(model_dir)
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--model", str(model_dir), "--out", str(out)]) == 0

    long_caption = " ".join(captions) * 8  # longer than max_length (256 tokens): truncated
    caption_batches = [captions[:1], [*captions, long_caption]]
    check_parity(out, model, images, caption_batches, image_batches=(2, 4))
    assert tokenize(out, [long_caption])["input_ids"].shape[1] == model.config.text.max_length == 256
