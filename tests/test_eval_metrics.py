"""Classification metrics and confusion matrix on hand-written arrays; the plot behind its optional import."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from clipcraft.errors import ClipcraftError
from clipcraft.evaluation import classification_metrics, confusion_matrix, plot_confusion_matrix

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

SCORES = np.array(
    [
        [0.1, 0.7, 0.2],  # label 1: highest -> rank 1
        [0.5, 0.5, 0.0],  # label 1: tied with class 0, lower index wins -> rank 2
        [0.3, 0.3, 0.4],  # label 0: class 2 higher, class 1 tied but later -> rank 2
        [0.9, 0.05, 0.05],  # label 2: class 0 higher, class 1 tied and earlier -> rank 3
    ]
)
LABELS = np.array([1, 1, 0, 2])


def test_hand_checked_topk_and_mean_per_class_recall() -> None:
    m = classification_metrics(SCORES, LABELS, k=(1, 2, 3, 5))
    assert m["top1"] == 0.25
    assert m["top2"] == 0.75
    assert m["top3"] == 1.0
    assert m["top5"] == 1.0  # k >= C: every image is a hit
    # class 0: 0/1, class 1: 1/2, class 2: 0/1
    assert m["mean_per_class_recall"] == pytest.approx(1 / 6)
    assert m["num_images"] == 4 and m["num_classes"] == 3


def test_default_keys_and_absent_classes_left_out_of_recall() -> None:
    scores = np.eye(4)[[0, 0, 1]]  # 4 classes, only classes 0 and 1 occur; predictions 0, 0, 1
    m = classification_metrics(scores, [0, 1, 1])
    assert set(m) == {"top1", "top5", "mean_per_class_recall", "num_images", "num_classes"}
    assert m["mean_per_class_recall"] == pytest.approx((1 / 1 + 1 / 2) / 2)
    assert m["num_classes"] == 4


def test_top1_agrees_with_argmax_under_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(200, 6)).astype(np.float32)  # many ties
    labels = rng.integers(0, 6, size=200)
    pred = scores.argmax(axis=1)
    m = classification_metrics(scores, labels)
    assert m["top1"] == pytest.approx(np.mean(pred == labels))
    cm = confusion_matrix(pred, labels, 6)
    assert np.trace(cm) == np.sum(pred == labels)
    assert cm.sum(axis=1).tolist() == np.bincount(labels, minlength=6).tolist()


def test_hand_checked_confusion_matrix() -> None:
    pred = SCORES.argmax(axis=1)  # [1, 0, 2, 0]
    cm = confusion_matrix(pred, LABELS, 3)
    assert cm.tolist() == [[0, 0, 1], [1, 1, 0], [1, 0, 0]]
    assert cm.dtype == np.int64


def test_metric_input_errors() -> None:
    with pytest.raises(ClipcraftError, match="outside 0..2"):
        classification_metrics(SCORES, [0, 1, 2, 3])
    with pytest.raises(ClipcraftError, match="3 entries but there are 4"):
        classification_metrics(SCORES, [0, 1, 2])
    with pytest.raises(ClipcraftError, match=r"\(N, C\)"):
        classification_metrics(np.zeros(3), [0])
    with pytest.raises(ClipcraftError, match="NaN"):
        classification_metrics(np.full((1, 2), np.nan), [0])
    with pytest.raises(ClipcraftError, match="outside 0..1"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_plot_rejects_mismatched_names_before_needing_matplotlib(tmp_path: Path) -> None:
    with pytest.raises(ClipcraftError, match="2 class names for a 3-class"):
        plot_confusion_matrix(np.eye(3), ["a", "b"], tmp_path / "cm.png")


def test_plot_without_matplotlib_names_the_install(tmp_path: Path, monkeypatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ClipcraftError, match="pip install matplotlib"):
        plot_confusion_matrix(np.eye(2), ["a", "b"], tmp_path / "cm.png")


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib (pip install matplotlib)")
def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["cat", "dog"], tmp_path / "sub" / "cm.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
