"""Dropping near-duplicates from a ranked result list: the same photo saved twice, burst shots, resized
copies. A result is dropped when its cosine similarity to a better-ranked kept result reaches a threshold."""

from __future__ import annotations

import numpy as np


def drop_near_duplicates(
    ids: np.ndarray, embeddings: np.ndarray, threshold: float, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Walk ``ids`` (R,) best first and keep a row unless its embedding has cosine >= ``threshold`` with a
    row already kept; stop at ``k`` kept.

    ``embeddings`` (N, D) are unit rows indexed by ``ids`` (ids < 0, empty slots of an approximate search,
    are skipped). Returns ``(positions in ids of the kept rows, their ids)``, both (<= k,), in rank order.
    ``threshold`` in (0, 1]: 1.0 drops exact duplicates only, lower values drop more.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    kept_pos: list[int] = []
    kept_vecs = np.zeros((0, embeddings.shape[1]), dtype=np.float32)  # (kept, D)
    for pos, row in enumerate(np.asarray(ids).tolist()):
        if len(kept_pos) >= k:
            break
        if row < 0:
            continue
        vec = np.asarray(embeddings[row], dtype=np.float32)  # (D,)
        # the 1e-6 slack: a duplicate's cosine with itself comes out of float32 as 0.9999999
        if kept_vecs.shape[0] and float((kept_vecs @ vec).max()) >= threshold - 1e-6:
            continue
        kept_pos.append(pos)
        kept_vecs = np.vstack([kept_vecs, vec[None, :]])
    positions = np.asarray(kept_pos, dtype=np.int64)
    return positions, np.asarray(ids)[positions] if len(positions) else np.zeros(0, dtype=np.int64)
