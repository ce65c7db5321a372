"""Linear probe: separable clusters, grid choice, determinism, the stratified split, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from clipcraft.errors import ClipcraftError
from clipcraft.evaluation import classification_metrics, fit_linear_probe, stratified_split

pytest.importorskip("sklearn", reason="the linear probe needs scikit-learn")


def _clusters(n_per_class: int, n_classes: int = 4, dim: int = 12, seed: int = 0, spread: float = 0.5):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(n_classes, dim)) * 3.0  # same centres for every split
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    order = rng.permutation(labels.size)
    return features[order].astype(np.float32), labels[order]


def test_separable_clusters_are_classified_perfectly() -> None:
    x, y = _clusters(60)
    x_test, y_test = _clusters(25, seed=1)
    grid = (1e-4, 1e-2, 1.0)
    probe = fit_linear_probe(x, y, l2_grid=grid, seed=0)
    m = probe.evaluate(x_test, y_test)
    assert m["top1"] == 1.0
    assert m["mean_per_class_recall"] == 1.0
    assert m["num_images"] == 100 and m["num_classes"] == 4
    assert probe.l2 in grid
    assert sorted(probe.val_accuracy) == sorted(grid)
    best = max(probe.val_accuracy.values())
    assert probe.l2 == max(l2 for l2, acc in probe.val_accuracy.items() if acc == best)  # ties: stronger L2
    assert probe.predict_scores(x_test).shape == (100, 4)


def test_grid_choice_follows_validation_accuracy() -> None:
    # Imbalanced classes: a huge L2 shrinks the weights to ~0, leaving the (unpenalized) intercept to predict
    # the majority class, so its validation accuracy drops and it must not be chosen.
    x, y = _clusters(40, n_classes=3, seed=3)
    keep = (y == 0) | (np.arange(y.size) % 4 == 0)
    x, y = x[keep], y[keep]
    probe = fit_linear_probe(x, y, l2_grid=(1e-3, 1e4), seed=0)
    assert probe.val_accuracy[1e-3] > probe.val_accuracy[1e4]
    assert probe.l2 == 1e-3


def test_fit_is_deterministic_given_seed() -> None:
    x, y = _clusters(30, spread=2.5, seed=5)
    a = fit_linear_probe(x, y, l2_grid=(1e-3, 1e-1), seed=7)
    b = fit_linear_probe(x, y, l2_grid=(1e-3, 1e-1), seed=7)
    np.testing.assert_array_equal(a.coef, b.coef)
    np.testing.assert_array_equal(a.intercept, b.intercept)
    assert a.val_accuracy == b.val_accuracy


def test_stratified_split_keeps_class_proportions_and_depends_on_seed() -> None:
    labels = np.array([0] * 50 + [1] * 20 + [2] * 10 + [3])
    train, val = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[val], minlength=4).tolist() == [10, 4, 2, 0]  # the singleton stays in train
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(labels.size))
    _, val_other = stratified_split(labels, 0.2, seed=1)
    assert val.tolist() != val_other.tolist()
    _, val_again = stratified_split(labels, 0.2, seed=0)
    assert val.tolist() == val_again.tolist()


def test_explicit_val_set_string_labels_and_binary_scores() -> None:
    x, y = _clusters(30, n_classes=2)
    names = np.array(["cat", "dog"])[y]
    xv, yv = _clusters(10, n_classes=2, seed=2)
    probe = fit_linear_probe(
        x, names, val_features=xv, val_labels=np.array(["cat", "dog"])[yv], l2_grid=(1e-2,)
    )
    assert probe.classes.tolist() == ["cat", "dog"]
    scores = probe.predict_scores(xv)
    assert scores.shape == (20, 2)
    assert (probe.predict(xv) == np.array(["cat", "dog"])[yv]).all()
    m = probe.evaluate(xv, np.array(["cat", "dog"])[yv])
    assert m == classification_metrics(scores, yv)
    assert m["top1"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_labels": np.zeros(20, dtype=int)}, "at least two classes"),
        ({"train_labels": np.arange(19) % 2}, "one label per row"),
        ({"l2_grid": ()}, "l2_grid"),
        ({"l2_grid": (0.0, 1.0)}, "l2_grid"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"val_features": np.zeros((2, 3))}, "both val_features and val_labels"),
        ({"train_features": np.full((20, 3), np.nan)}, "NaN"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs: dict, match: str) -> None:
    args = {
        "train_features": np.random.default_rng(0).normal(size=(20, 3)),
        "train_labels": np.arange(20) % 2,
    }
    args.update(kwargs)
    with pytest.raises(ClipcraftError, match=match):
        fit_linear_probe(args.pop("train_features"), args.pop("train_labels"), **args)


def test_evaluate_rejects_unseen_labels_and_wrong_width() -> None:
    x, y = _clusters(20, n_classes=3)
    probe = fit_linear_probe(x, y, l2_grid=(1e-2,))
    with pytest.raises(ClipcraftError, match="never seen in training"):
        probe.evaluate(x[:2], [0, 7])
    with pytest.raises(ClipcraftError, match="12-d features"):
        probe.predict_scores(np.zeros((2, 5)))
