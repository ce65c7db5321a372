"""Linear probe: multinomial logistic regression on frozen features, L2 strength chosen on a validation split.

The fit uses scikit-learn's L-BFGS logistic regression, imported only inside :func:`fit_linear_probe`; the
fitted :class:`LinearProbe` is plain numpy and scores features without scikit-learn.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from clipcraft.errors import ClipcraftError
from clipcraft.evaluation.metrics import classification_metrics

# L2 strengths tried, per training example: the loss minimised is mean(cross-entropy) + l2 / 2 * ||W||^2 on
# standardized features, so one value means the same regularization at any training-set size.
DEFAULT_L2_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class LinearProbe:
    """A fitted linear probe: ``scores = ((x - mean) / scale) @ coef.T + intercept``.

    ``classes`` (C,) holds the original labels in column order; ``coef`` (C, D) and ``intercept`` (C,) act
    on standardized features; ``l2`` is the chosen strength and ``val_accuracy`` maps each grid value to its
    validation top-1 accuracy. ``converged`` is False when the final refit hit ``max_iter``.
    """

    classes: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    l2: float
    val_accuracy: dict[float, float] = field(default_factory=dict)
    converged: bool = True

    def predict_scores(self, features: np.ndarray) -> np.ndarray:
        """Class logits (N, C) float64 for features (N, D); column ``c`` is ``classes[c]``."""
        x = _check_features(features, "features")
        if x.shape[1] != self.mean.shape[0]:
            raise ClipcraftError(
                f"The probe was fitted on {self.mean.shape[0]}-d features; got {x.shape[1]}-d."
            )
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept  # (N, C)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted labels (N,), drawn from ``classes`` (ties: the earlier class)."""
        return self.classes[self.predict_scores(features).argmax(axis=1)]

    def evaluate(self, test_features: np.ndarray, test_labels: np.ndarray | Sequence) -> dict[str, float]:
        """Metrics on a test set, keys as :func:`classification_metrics` (``top1 top5 mean_per_class_recall
        num_images num_classes``). Test labels must be among ``classes``, else :class:`ClipcraftError`."""
        scores = self.predict_scores(test_features)  # (N, C)
        labels = np.asarray(test_labels)
        if labels.shape != (scores.shape[0],):
            raise ClipcraftError(f"Got {labels.shape} test labels for {scores.shape[0]} test feature rows.")
        try:
            idx = np.searchsorted(self.classes, labels)  # classes are sorted (np.unique)
        except TypeError as exc:  # e.g. int test labels against string classes
            raise ClipcraftError(
                f"Test labels ({labels.dtype}) cannot be compared with the training classes ({self.classes.dtype})."
            ) from exc
        idx = np.minimum(idx, len(self.classes) - 1)
        unknown = np.flatnonzero(self.classes[idx] != labels)
        if unknown.size:
            raise ClipcraftError(
                f"{unknown.size} test label(s) were never seen in training, e.g. {labels[unknown[0]].item()!r}."
            )
        return classification_metrics(scores, idx)


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ClipcraftError(f"{name} must be a non-empty (N, D) array; got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ClipcraftError(f"{name} contain NaN or infinite values.")
    return x


def _check_pair(
    features: np.ndarray, labels: np.ndarray | Sequence, name: str
) -> tuple[np.ndarray, np.ndarray]:
    x = _check_features(features, f"{name} features")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ClipcraftError(
            f"{name}: {x.shape[0]} feature rows but labels of shape {y.shape}; give one label per row."
        )
    return x, y


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` with about ``val_fraction`` of every class in val, at least one per class in
    train, and classes of one example left wholly in train. Deterministic given ``seed``; both sorted."""
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    val_idx: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = min(int(round(val_fraction * members.size)), members.size - 1)
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)  # (D,)
    scale = x.std(axis=0)  # (D,)
    scale[scale < 1e-12] = 1.0  # constant features stay zero after centering
    return mean, scale


def fit_linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray | Sequence,
    *,
    val_features: np.ndarray | None = None,
    val_labels: np.ndarray | Sequence | None = None,
    val_fraction: float = 0.2,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    seed: int = 0,
    max_iter: int = 1000,
    num_threads: int = 1,
) -> LinearProbe:
    """Fit a multinomial logistic-regression probe on frozen features.

    ``train_features`` (N, D) float, ``train_labels`` (N,) of any sortable label type (ints or strings).
    The L2 strength (per example: loss = mean cross-entropy + l2/2 * ||W||^2 on standardized features) is
    chosen from ``l2_grid`` by top-1 accuracy on a validation set: ``val_features``/``val_labels`` if given,
    else a stratified ``val_fraction`` of the training set drawn with ``seed``. Ties go to the stronger
    regularization. The probe is then refitted on train + val with the chosen strength; features are
    standardized with the mean/std of the data each fit sees. Deterministic given the inputs and ``seed``.
    The solver runs with ``num_threads`` BLAS/OpenMP threads (1 by default: faster on small machines, where
    the two thread pools contend); ``max_iter`` caps L-BFGS iterations per fit.

    Raises :class:`ClipcraftError` for mismatched lengths, non-finite features, fewer than two classes, an
    empty or non-positive grid, a validation split that comes out empty, or a missing scikit-learn
    (``pip install scikit-learn``).
    """
    x, y = _check_pair(train_features, train_labels, "train")
    if (val_features is None) != (val_labels is None):
        raise ClipcraftError("Give both val_features and val_labels, or neither.")
    grid = sorted({float(v) for v in l2_grid}, reverse=True)  # strongest first: ties keep the first
    if not grid or any(not np.isfinite(v) or v <= 0 for v in grid):
        raise ClipcraftError(f"l2_grid must hold positive finite numbers; got {list(l2_grid)}.")
    if len(np.unique(y)) < 2:
        raise ClipcraftError(
            f"A linear probe needs at least two classes; the training labels hold {np.unique(y)}."
        )

    if val_features is not None:
        xv, yv = _check_pair(val_features, val_labels, "val")
        if xv.shape[1] != x.shape[1]:
            raise ClipcraftError(f"Train features are {x.shape[1]}-d but val features are {xv.shape[1]}-d.")
        x_fit, y_fit, x_val, y_val = x, y, xv, yv
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ClipcraftError(f"val_fraction must be in (0, 1); got {val_fraction}.")
        tr, va = stratified_split(y, val_fraction, seed)
        if va.size == 0:
            raise ClipcraftError(
                f"The validation split is empty ({y.shape[0]} examples, val_fraction={val_fraction}); "
                "pass more data, a larger val_fraction, or an explicit val set."
            )
        x_fit, y_fit, x_val, y_val = x[tr], y[tr], x[va], y[va]
    if len(np.unique(y_fit)) < 2:
        raise ClipcraftError("After carving the validation split the training part holds a single class.")

    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    except ImportError as exc:
        raise ClipcraftError("The linear probe needs scikit-learn. Run `pip install scikit-learn`.") from exc

    def fit(features: np.ndarray, labels: np.ndarray, l2: float, init: object = None) -> tuple[object, bool]:
        # sklearn minimises C * sum(loss) + ||W||^2 / 2, so C = 1 / (l2 * n) gives our per-example l2.
        clf = LogisticRegression(
            C=1.0 / (l2 * features.shape[0]), max_iter=max_iter, tol=1e-6, warm_start=True
        )
        if init is not None:  # warm start from the neighbouring grid point: same optimum, fewer iterations
            clf.coef_, clf.intercept_ = init.coef_.copy(), init.intercept_.copy()  # type: ignore[attr-defined]
        # scikit-learn's OpenMP loss threads and OpenBLAS's spinning threads fight over the cores, and the
        # (N, D) @ (D, C) products are too thin to gain from threads: on 2 cores the 10k x 768, 10-class probe
        # took 12.7 s with 2 threads and 7.6 s with 1.
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=num_threads):
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(features, labels)
        return clf, not any(issubclass(w.category, ConvergenceWarning) for w in caught)

    # Statistics in float64; the solver runs on float32 copies, which is ~2.5x faster and plenty for a probe.
    mean, scale = _standardizer(x_fit)
    z_fit = ((x_fit - mean) / scale).astype(np.float32)  # (N_fit, D)
    z_val = ((x_val - mean) / scale).astype(np.float32)  # (N_val, D)
    val_accuracy: dict[float, float] = {}
    best_l2, best_acc, prev = grid[0], -1.0, None
    for l2 in grid:
        clf, _ = fit(z_fit, y_fit, l2, prev)
        prev = clf
        acc = float(np.mean(clf.predict(z_val) == y_val))  # type: ignore[attr-defined]
        val_accuracy[l2] = acc
        if acc > best_acc:
            best_l2, best_acc = l2, acc

    x_all = np.concatenate([x_fit, x_val])  # (N_fit + N_val, D)
    y_all = np.concatenate([y_fit, y_val])
    mean, scale = _standardizer(x_all)
    clf, converged = fit(((x_all - mean) / scale).astype(np.float32), y_all, best_l2)
    classes = np.asarray(clf.classes_)  # type: ignore[attr-defined]  # sorted, as np.unique
    coef = np.asarray(clf.coef_, dtype=np.float64)  # type: ignore[attr-defined]  # (C, D) or (1, D) for two
    intercept = np.asarray(clf.intercept_, dtype=np.float64)  # type: ignore[attr-defined]
    if classes.size == 2 and coef.shape[0] == 1:  # binary: sklearn keeps one logit z; softmax over (0, z)
        coef = np.vstack([np.zeros_like(coef), coef])  # (2, D)
        intercept = np.array([0.0, intercept[0]])
    return LinearProbe(
        classes=classes,
        mean=mean,
        scale=scale,
        coef=coef,
        intercept=intercept,
        l2=best_l2,
        val_accuracy=val_accuracy,
        converged=converged,
    )
