"""Classification metrics as pure functions over arrays, shared by zero-shot and linear-probe evaluation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipcraft.errors import ClipcraftError


def _check_labels(
    labels: np.ndarray | Sequence[int], num_classes: int, n: int | None, name: str
) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ClipcraftError(f"{name} must be 1-D; got shape {labels.shape}.")
    if n is not None and labels.shape[0] != n:
        raise ClipcraftError(f"{name} has {labels.shape[0]} entries but there are {n} images.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ClipcraftError(f"{name} must be integer class indices; got dtype {labels.dtype}.")
    labels = labels.astype(np.int64, copy=False)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ClipcraftError(
            f"{name} has {bad.size} value(s) outside 0..{num_classes - 1}; first: row {bad[0]} = {labels[bad[0]]}."
        )
    return labels


def classification_metrics(
    scores: np.ndarray, labels: np.ndarray | Sequence[int], k: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall from class scores.

    ``scores`` (N, C) float: logits, probabilities or similarities, higher = more likely; ``labels`` (N,) int
    class indices in ``0..C-1``. Returns ``top{k}`` for each k (fraction in [0, 1]), ``mean_per_class_recall``
    (top-1 recall averaged over the classes that occur in ``labels``; classes with no images are left out),
    ``num_images`` and ``num_classes`` (= C, also counting classes with no images).

    The prediction is ``argmax`` over classes, and ties are broken the same way everywhere: the lower class
    index wins. So the rank of the true class is 1 + (#classes scoring strictly higher) + (#lower-indexed
    classes scoring equal), ``top1`` equals the accuracy of ``scores.argmax(1)``, and the confusion matrix
    agrees with it. When ``k >= C`` every image is a hit, so ``top5`` is 1.0 for fewer than 5 classes.
    Raises :class:`ClipcraftError` on empty input, shape mismatch, labels out of range or non-finite scores.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ClipcraftError(f"scores must be a non-empty (N, C) array; got shape {scores.shape}.")
    if not np.isfinite(scores).all():
        raise ClipcraftError("scores contain NaN or infinite values.")
    n, c = scores.shape
    labels = _check_labels(labels, c, n, "labels")
    ks = list(k)
    if any(int(kk) < 1 for kk in ks):
        raise ClipcraftError(f"k must be positive integers; got {ks}.")

    right = scores[np.arange(n), labels]  # (N,)
    higher = np.count_nonzero(scores > right[:, None], axis=1)  # (N,)
    lower_index = np.arange(c)[None, :] < labels[:, None]  # (N, C)
    tied_before = np.count_nonzero((scores == right[:, None]) & lower_index, axis=1)  # (N,)
    rank = 1 + higher + tied_before  # (N,) 1-based

    out: dict[str, float] = {f"top{int(kk)}": float(np.mean(rank <= int(kk))) for kk in ks}
    hit = rank == 1  # (N,)
    present = np.flatnonzero(np.bincount(labels, minlength=c))
    per_class = (
        np.bincount(labels, weights=hit, minlength=c)[present] / np.bincount(labels, minlength=c)[present]
    )
    out["mean_per_class_recall"] = float(per_class.mean())
    out["num_images"] = float(n)
    out["num_classes"] = float(c)
    return out


def confusion_matrix(
    pred: np.ndarray | Sequence[int], labels: np.ndarray | Sequence[int], num_classes: int
) -> np.ndarray:
    """Counts of (true, predicted) pairs: ``cm[t, p]`` = number of images of class ``t`` predicted as ``p``.

    ``pred`` and ``labels`` (N,) int in ``0..num_classes-1``. Returns (num_classes, num_classes) int64; rows
    sum to the class sizes and the diagonal holds the correct predictions.
    """
    if num_classes < 1:
        raise ClipcraftError(f"num_classes must be positive; got {num_classes}.")
    labels = _check_labels(labels, num_classes, None, "labels")
    pred = _check_labels(pred, num_classes, labels.shape[0], "pred")
    flat = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def plot_confusion_matrix(
    cm: np.ndarray,
    classnames: Sequence[str],
    path: str | os.PathLike[str],
    *,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Write a confusion matrix (rows = true class, columns = predicted) as a PNG at ``path``.

    ``cm`` (C, C) counts as from :func:`confusion_matrix`; with ``normalize`` each row is divided by its sum
    (so cells are per-class recall). Needs matplotlib, imported here only: a missing install raises
    :class:`ClipcraftError` naming ``pip install matplotlib``. Returns the path written.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ClipcraftError(f"Confusion matrix must be square (C, C); got shape {cm.shape}.")
    if len(classnames) != cm.shape[0]:
        raise ClipcraftError(f"Got {len(classnames)} class names for a {cm.shape[0]}-class confusion matrix.")
    try:
        # The Figure API draws without pyplot, so the caller's backend and open figures are left alone.
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ClipcraftError(
            "Plotting a confusion matrix needs matplotlib, which is not installed. Run `pip install matplotlib`."
        ) from exc

    values = cm.astype(np.float64)  # (C, C)
    if normalize:
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1.0)
    c = cm.shape[0]
    side = min(max(4.0, 0.35 * c + 2.0), 40.0)
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if c <= 60:  # beyond that the labels are unreadable anyway
        ax.set_xticks(range(c), labels=list(classnames), rotation=90, fontsize=8)
        ax.set_yticks(range(c), labels=list(classnames), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out
