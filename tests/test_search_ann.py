"""Exact and approximate nearest-neighbour search: FAISS against the plain numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from clipcraft.errors import ClipcraftError
from clipcraft.search.ann import IndexConfig, build_faiss, exact_search, recall_at_k, resolve_kind


def clustered(n: int, d: int = 48, clusters: int = 40, subspace: int = 12, seed: int = 0) -> np.ndarray:
    """Unit vectors from a mixture of clusters in a low-dimensional subspace (real-embedding-like)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, subspace)))[0].T  # (S, D) orthonormal rows
    centers = rng.normal(size=(clusters, subspace))
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, subspace))
    x = x @ basis + 0.02 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_search_on_a_hand_matrix():
    vectors = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    scores, ids = exact_search(vectors, np.array([[1, 0]], dtype=np.float32), k=3)
    assert ids.tolist() == [[0, 2, 1]]
    np.testing.assert_allclose(scores, [[1.0, 0.6, 0.0]], atol=1e-6)
    _, ids = exact_search(vectors, np.array([[0, 1]], dtype=np.float32), k=10)  # k > N: all rows
    assert ids.tolist() == [[1, 2, 0, 3]]


def test_recall_at_k_counts_overlap():
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 1], [4, 0, 9]])) == pytest.approx(
        (1.0 + 1 / 3) / 2
    )


def test_auto_kind_follows_the_threshold():
    config = IndexConfig(exact_threshold=1000)
    assert resolve_kind(config, 999) == "flat"
    assert resolve_kind(config, 1000) == "ivf"
    assert resolve_kind(IndexConfig(kind="hnsw"), 10) == "hnsw"
    with pytest.raises(ClipcraftError, match="index kind"):
        resolve_kind(IndexConfig(kind="lsh"), 10)


def test_flat_faiss_matches_numpy_exactly():
    x = clustered(3000)
    q = clustered(50, seed=1)
    index, info = build_faiss(x, IndexConfig(kind="flat"))
    assert info["kind"] == "flat"
    scores, ids = index.search(q, 10)
    ref_scores, ref_ids = exact_search(x, q, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # ids agree except where two scores tie to float precision
    assert (ids == ref_ids).mean() > 0.99


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_against_exact(kind):
    data = clustered(6200)
    x, q = data[:6000], data[6000:]  # fresh queries from the same distribution
    index, info = build_faiss(x, IndexConfig(kind=kind, target_recall=0.95))
    assert info["kind"] == kind
    assert info["tuned_recall_at_10"] >= 0.95
    _, found = index.search(q, 10)
    _, truth = exact_search(x, q, 10)
    assert recall_at_k(found, truth) >= 0.9


def test_low_search_effort_loses_recall_so_the_check_can_fail():
    data = clustered(6200)
    x, q = data[:6000], data[6000:]
    index, info = build_faiss(x, IndexConfig(kind="ivf", nlist=64, nprobe=1))
    assert info["nprobe"] == 1
    _, found = index.search(q, 10)
    _, truth = exact_search(x, q, 10)
    assert recall_at_k(found, truth) < 0.9
