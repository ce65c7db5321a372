"""Zero-shot classifier parity with a plain argmax, logit scale handling, template and class-name files."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcraft.errors import ClipcraftError
from clipcraft.evaluation import (
    DEFAULT_TEMPLATES,
    ZeroShotClassifier,
    build_classifier_weights,
    load_templates,
    read_classnames,
)

DIM = 16
CLASSES = ["cat", "dog", "bird", "boat"]


def _text_vector(text: str) -> np.ndarray:
    """A fixed pseudo-random embedding per string, not normalized."""
    return np.random.default_rng(zlib.crc32(text.encode())).normal(size=DIM).astype(np.float32) * 3.0


class FakeModel:
    """Texts embed by hash; "images" are raw vectors the fake encoder passes through."""

    def __init__(self, logit_scale: object = None) -> None:
        if logit_scale is not None:
            self.logit_scale = logit_scale
        self.text_calls: list[dict] = []
        self.image_precisions: list[str] = []

    def encode_texts(
        self, texts: list[str], batch_size: int = 32, normalize: bool = True, precision: str = "fp32"
    ) -> np.ndarray:
        self.text_calls.append(
            {"n": len(texts), "batch_size": batch_size, "normalize": normalize, "precision": precision}
        )
        out = np.stack([_text_vector(t) for t in texts])  # (N, D)
        return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize else out

    def encode_images(
        self, images: list, batch_size: int = 32, normalize: bool = True, precision: str = "fp32"
    ) -> np.ndarray:
        self.image_precisions.append(precision)
        out = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (N, D)
        return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize else out


def _independent_class_embeddings(templates: list[str]) -> np.ndarray:
    rows = []
    for name in CLASSES:
        vecs = [_text_vector(t.format(name)) for t in templates]
        vecs = [v / np.linalg.norm(v) for v in vecs]
        mean = np.mean(vecs, axis=0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)  # (C, D)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=DIM) for _ in range(n)]


def test_predictions_equal_plain_argmax_over_averaged_text_embeddings() -> None:
    templates = ["a photo of a {}.", "a drawing of a {}.", "{} in the wild"]
    model = FakeModel()
    clf = ZeroShotClassifier(model, CLASSES, templates, batch_size=7)
    images = _images(50)
    labels, probs = clf.predict(images, batch_size=8)

    weights = _independent_class_embeddings(templates)
    x = np.stack(images)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = (x @ weights.T).argmax(axis=1)
    assert labels == [CLASSES[i] for i in expected]
    assert len(set(labels)) > 1  # the data exercise more than one class
    np.testing.assert_allclose(clf.weights, weights, atol=1e-6)
    assert probs.shape == (50, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert model.text_calls == [{"n": 12, "batch_size": 7, "normalize": True, "precision": "fp32"}]


def test_weights_are_renormalized_even_from_an_unnormalizing_encoder() -> None:
    templates = ["a photo of a {}.", "a {} again"]
    w = build_classifier_weights(lambda p: FakeModel().encode_texts(p, normalize=False), CLASSES, templates)
    np.testing.assert_allclose(w, _independent_class_embeddings(templates), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("logit_scale", "expected_scale"),
    [
        (None, 100.0),
        (torch.nn.Parameter(torch.tensor(math.log(10.0))), 10.0),
        (math.log(2.5), 2.5),
    ],
)
def test_softmax_uses_exp_of_the_models_logit_scale(logit_scale: object, expected_scale: float) -> None:
    clf = ZeroShotClassifier(FakeModel(logit_scale), CLASSES, ["a photo of a {}."])
    assert clf.logit_scale == pytest.approx(expected_scale)
    emb = np.stack(_images(5, seed=1))
    _, probs = clf.predict_embeddings(emb)
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ _independent_class_embeddings(
        ["a photo of a {}."]
    ).T
    e = np.exp(expected_scale * cos - (expected_scale * cos).max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), atol=1e-5)


def test_default_templates_are_used_and_well_formed() -> None:
    model = FakeModel()
    clf = ZeroShotClassifier(model, CLASSES)
    assert clf.templates == list(DEFAULT_TEMPLATES)
    assert 10 <= len(DEFAULT_TEMPLATES) <= 20
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)
    assert len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    assert model.text_calls[0]["n"] == len(CLASSES) * len(DEFAULT_TEMPLATES)


def test_embedding_width_mismatch_and_empty_inputs() -> None:
    clf = ZeroShotClassifier(FakeModel(), CLASSES, ["{}"])
    with pytest.raises(ClipcraftError, match="match the class embeddings"):
        clf.predict_embeddings(np.ones((2, DIM + 1)))
    with pytest.raises(ClipcraftError, match="at least one class"):
        ZeroShotClassifier(FakeModel(), [], ["{}"])
    with pytest.raises(ClipcraftError, match="no '\\{\\}'"):
        ZeroShotClassifier(FakeModel(), CLASSES, ["a photo"])
    with pytest.raises(ClipcraftError, match="expected"):
        build_classifier_weights(lambda p: np.ones((1, DIM)), CLASSES, ["{}"])


def test_load_templates_skips_comments_and_blanks(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("# my prompts\n\n  a photo of a {}.  \na {{odd}} {} with braces\n", encoding="utf-8")
    assert load_templates(path) == ["a photo of a {}.", "a {{odd}} {} with braces"]
    w = build_classifier_weights(
        lambda p: np.stack([_text_vector(t) for t in p]), ["x"], load_templates(path)
    )
    assert w.shape == (1, DIM)


def test_load_templates_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\n\na photo of a thing\n", encoding="utf-8")
    with pytest.raises(ClipcraftError, match=r"t\.txt:3: .*no '\{\}'"):
        load_templates(path)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ClipcraftError, match="holds no templates"):
        load_templates(empty)
    with pytest.raises(ClipcraftError, match="not found"):
        load_templates(tmp_path / "missing.txt")


def test_read_classnames_tab_and_plain_formats(tmp_path: Path) -> None:
    tabbed = tmp_path / "wnids.txt"
    tabbed.write_text("n02\tgoldfish\nn01\ttench, Tinca tinca\n\nn03\tgreat white shark\n", encoding="utf-8")
    assert read_classnames(tabbed) == ["goldfish", "tench, Tinca tinca", "great white shark"]
    assert read_classnames(tabbed, folders=["n01", "n02", "n03"]) == [
        "tench, Tinca tinca",
        "goldfish",
        "great white shark",
    ]
    plain = tmp_path / "names.txt"
    plain.write_text("airplane\n automobile \nbird\n", encoding="utf-8")
    assert read_classnames(plain) == ["airplane", "automobile", "bird"]


def test_read_classnames_errors(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("n01\ttench\ngoldfish\n", encoding="utf-8")
    with pytest.raises(ClipcraftError, match=r"mixed\.txt:2: mixes"):
        read_classnames(mixed)
    tabbed = tmp_path / "wnids.txt"
    tabbed.write_text("n01\ttench\nn02\tgoldfish\n", encoding="utf-8")
    with pytest.raises(ClipcraftError, match="no name for 1 of 2"):
        read_classnames(tabbed, folders=["n01", "n09"])
    dup = tmp_path / "dup.txt"
    dup.write_text("n01\ttench\nn01\tgoldfish\n", encoding="utf-8")
    with pytest.raises(ClipcraftError, match="listed twice"):
        read_classnames(dup, folders=["n01"])
    blank_name = tmp_path / "blank.txt"
    blank_name.write_text("n01\t \n", encoding="utf-8")
    with pytest.raises(ClipcraftError, match="empty folder or class name"):
        read_classnames(blank_name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prompts_and_images_use_one_precision(precision: str) -> None:
    model = FakeModel()
    clf = ZeroShotClassifier(model, ["cat", "dog"], ["a {}."], precision=precision)
    clf.predict([np.ones(DIM, dtype=np.float32)])
    assert [c["precision"] for c in model.text_calls] == [precision]
    assert model.image_precisions == [precision]
    default = FakeModel()
    ZeroShotClassifier(default, ["cat"], ["a {}."]).predict([np.ones(DIM, dtype=np.float32)])
    assert default.text_calls[0]["precision"] == default.image_precisions[0] == "fp32"
