"""Retrieval metrics: hand-checked matrices (ties, several captions per image) and chunked/dense/loop parity."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from clipcraft.errors import ClipcraftError
from clipcraft.evaluation import (
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_metrics_from_similarity,
    retrieval_ranks,
    retrieval_ranks_from_similarity,
)

# 3 images, 5 captions: image 0 has captions 0 and 1, image 1 has caption 2, image 2 has captions 3 and 4.
T2I = np.array([0, 0, 1, 2, 2])
SIM = np.array(
    [
        [0.9, 0.1, 0.5, 0.3, 0.2],  # img 0: best own caption 0.9, nothing wrong above -> rank 1
        [0.8, 0.2, 0.6, 0.7, 0.1],  # img 1: own 0.6, wrong 0.8 and 0.7 above -> rank 3
        [
            0.4,
            0.4,
            0.4,
            0.4,
            0.1,
        ],  # img 2: own best 0.4, three wrong captions tie at 0.4 -> rank 4 (ties count against)
    ]
)
# Text -> image, by column: cap0 0.9 best -> 1; cap1 0.1 below 0.2 and 0.4 -> 3; cap2 0.6 best -> 1;
# cap3 0.4 below img1's 0.7 -> 2; cap4 0.1 below 0.2 and tied with img1's 0.1 -> 3.


def test_hand_checked_ranks_with_ties_and_multiple_captions() -> None:
    i2t, t2i = retrieval_ranks_from_similarity(SIM, T2I)
    assert i2t.tolist() == [1, 3, 4]
    assert t2i.tolist() == [1, 3, 1, 2, 3]


def test_hand_checked_metrics() -> None:
    m = retrieval_metrics_from_similarity(SIM, T2I)
    assert m["i2t_r1"] == pytest.approx(1 / 3)
    assert m["i2t_r5"] == 1.0 and m["i2t_r10"] == 1.0
    assert m["i2t_mean_rank"] == pytest.approx(8 / 3)
    assert m["i2t_median_rank"] == 3.0
    assert m["t2i_r1"] == pytest.approx(2 / 5)
    assert m["t2i_r5"] == 1.0
    assert m["t2i_mean_rank"] == pytest.approx(2.0)
    assert m["t2i_median_rank"] == 2.0
    assert set(m) == {
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
        "i2t_mean_rank",
        "i2t_median_rank",
        "t2i_mean_rank",
        "t2i_median_rank",
    }


def test_constant_similarity_gets_worst_rank_not_best() -> None:
    # A collapsed model scores every pair alike; the pessimistic tie rule must not reward it.
    sim = np.zeros((3, 5))
    i2t, t2i = retrieval_ranks_from_similarity(sim, T2I)
    n_captions = np.bincount(T2I)
    assert i2t.tolist() == (5 - n_captions + 1).tolist()  # every wrong caption ahead of the first right one
    assert t2i.tolist() == [3] * 5
    assert retrieval_metrics_from_similarity(sim, T2I)["t2i_r1"] == 0.0


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_exact_ties_in_chunked_path(chunk_size: int) -> None:
    # Images 0 and 1 are identical, as are captions 0 and 1: every score is exact in float32.
    image_emb = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    text_emb = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    i2t, t2i = retrieval_ranks(image_emb, text_emb, [0, 1, 2], chunk_size=chunk_size)
    assert i2t.tolist() == [2, 2, 1]
    assert t2i.tolist() == [2, 2, 1]


def _loop_ranks(sim: np.ndarray, t2i: np.ndarray) -> tuple[list[int], list[int]]:
    """Reference: sort each query's candidates by score, wrong ones first among equals; rank = first right."""
    n_img, n_txt = sim.shape
    i2t = []
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda j, i=i: (-sim[i, j], t2i[j] == i))
        i2t.append(next(pos for pos, j in enumerate(order, start=1) if t2i[j] == i))
    t2i_ranks = []
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i, j=j: (-sim[i, j], i == t2i[j]))
        t2i_ranks.append(order.index(t2i[j]) + 1)
    return i2t, t2i_ranks


def _random_problem(seed: int, n_img: int = 37, n_extra: int = 64, dim: int = 16):
    rng = np.random.default_rng(seed)
    t2i = rng.permutation(np.concatenate([np.arange(n_img), rng.integers(0, n_img, n_extra)]))
    image_emb = rng.normal(size=(n_img, dim)).astype(np.float32)
    text_emb = (image_emb[t2i] + 1.5 * rng.normal(size=(t2i.size, dim))).astype(np.float32)
    image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    return image_emb, text_emb, t2i


@pytest.mark.parametrize("chunk_size", [1, 7, 37, 64, 1000])
def test_chunked_equals_dense_equals_loop(chunk_size: int) -> None:
    image_emb, text_emb, t2i = _random_problem(seed=chunk_size)
    sim = image_emb @ text_emb.T
    loop_i2t, loop_t2i = _loop_ranks(sim, t2i)
    dense_i2t, dense_t2i = retrieval_ranks_from_similarity(sim, t2i)
    chunk_i2t, chunk_t2i = retrieval_ranks(image_emb, text_emb, t2i, chunk_size=chunk_size)
    assert dense_i2t.tolist() == loop_i2t and chunk_i2t.tolist() == loop_i2t
    assert dense_t2i.tolist() == loop_t2i and chunk_t2i.tolist() == loop_t2i
    # The problem is hard enough that the ranks are not all 1 (else the parity would prove little).
    assert max(loop_i2t) > 1 and max(loop_t2i) > 1
    chunked = retrieval_metrics(image_emb, text_emb, t2i, chunk_size=chunk_size)
    assert chunked == metrics_from_ranks(np.array(loop_i2t), np.array(loop_t2i))
    assert chunked == retrieval_metrics_from_similarity(sim, t2i)


def test_chunked_path_never_holds_the_dense_matrix() -> None:
    rng = np.random.default_rng(0)
    n_img, n_txt = 400, 8000  # dense float32 similarity: 12.8 MB
    image_emb = rng.normal(size=(n_img, 4)).astype(np.float32)
    text_emb = rng.normal(size=(n_txt, 4)).astype(np.float32)
    t2i = np.arange(n_txt) % n_img
    tracemalloc.start()
    try:
        retrieval_ranks(image_emb, text_emb, t2i, chunk_size=16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak


@pytest.mark.parametrize(
    ("image_emb", "text_emb", "t2i", "match"),
    [
        (np.ones((2, 3)), np.ones((2, 4)), [0, 1], "width"),
        (np.ones((2, 3)), np.ones((2, 3)), [0, 1, 1], "one image index per caption"),
        (np.ones((2, 3)), np.ones((2, 3)), [0, 2], "outside the 2 images"),
        (np.ones((2, 3)), np.ones((2, 3)), [0, -1], "outside the 2 images"),
        (np.ones((3, 3)), np.ones((2, 3)), [0, 1], "no caption"),
        (np.ones((2, 3)), np.ones((2, 3)), [0.0, 1.0], "integer"),
        (np.ones(3), np.ones((2, 3)), [0, 1], "2-D"),
        (np.full((2, 3), np.nan), np.ones((2, 3)), [0, 1], "NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(image_emb, text_emb, t2i, match) -> None:
    with pytest.raises(ClipcraftError, match=match):
        retrieval_metrics(image_emb, text_emb, t2i)


def test_bad_chunk_size_and_dense_shape() -> None:
    with pytest.raises(ClipcraftError, match="chunk_size"):
        retrieval_metrics(np.eye(2), np.eye(2), [0, 1], chunk_size=0)
    with pytest.raises(ClipcraftError, match="no caption"):
        retrieval_metrics_from_similarity(np.zeros((3, 2)), [0, 1])
