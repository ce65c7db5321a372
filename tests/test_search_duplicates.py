"""Dropping near-duplicates from ranked results, on small hand-written embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from clipcraft.search.duplicates import drop_near_duplicates


def _unit(rows):
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# rows 0 and 1 are the same direction, 2 is 0.8 cosine to them, 3 is orthogonal
EMB = _unit([[1, 0, 0], [1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]])


def test_a_duplicate_of_a_better_result_is_dropped_and_order_is_kept():
    positions, ids = drop_near_duplicates(np.array([1, 0, 2, 3]), EMB, 0.99, k=10)
    assert ids.tolist() == [1, 2, 3] and positions.tolist() == [0, 2, 3]


def test_a_lower_threshold_drops_more():
    _, ids = drop_near_duplicates(np.array([0, 1, 2, 3]), EMB, 0.8, k=10)
    assert ids.tolist() == [0, 3]  # 2 has cosine 0.8 with 0


def test_threshold_one_keeps_near_but_not_equal_rows_and_k_stops_the_walk():
    _, ids = drop_near_duplicates(np.array([0, 2, 1, 3]), EMB, 1.0, k=2)
    assert ids.tolist() == [0, 2]


def test_empty_slots_are_skipped_and_a_bad_threshold_is_refused():
    _, ids = drop_near_duplicates(np.array([-1, 3, -1, 0]), EMB, 0.9, k=5)
    assert ids.tolist() == [3, 0]
    with pytest.raises(ValueError, match="threshold"):
        drop_near_duplicates(np.array([0]), EMB, 0.0, k=1)
