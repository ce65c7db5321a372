"""Embedding image files for an index: the shared encoding loop (:mod:`clipcraft.encoding`), batch by batch.

Unreadable files do not stop the run: the loader marks them, the batch goes on without them, and the caller
gets their names and reasons back. Batches come one at a time so that an interrupted build keeps what it did.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipcraft.digests import model_identity
from clipcraft.encoding import EncodeSettings, default_workers, encode_pixels, iter_encoded

__all__ = ["EmbeddedBatch", "default_workers", "embed_batch", "iter_embeddings", "model_identity"]


@dataclass
class EmbeddedBatch:
    """Embeddings of one loader batch: ``positions`` index the input paths; ``failed`` maps positions to errors."""

    positions: list[int]
    embeddings: np.ndarray  # (len(positions), D) float32, unit rows
    failed: dict[int, str]


def embed_batch(model: Any, pixels: torch.Tensor, precision: str, *, shortcut: bool = False) -> np.ndarray:
    """(B, 3, H, W) pixels -> (B, D) float32 unit-norm embeddings (no gradients); see
    :func:`clipcraft.encoding.encode_pixels`."""
    return encode_pixels(model, pixels, project=True, precision=precision, shortcut=shortcut)


def iter_embeddings(
    model: Any,
    paths: Sequence[str],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    precision: str = "auto",
    shortcut: bool | None = None,
) -> Iterator[EmbeddedBatch]:
    """Embed image files in batches, in input order, with ``workers`` loader processes (0: in this process;
    None: :func:`default_workers`).

    Yields one :class:`EmbeddedBatch` per loader batch; files that cannot be read or decoded appear in
    ``failed`` (with the reason) instead of ``positions``. ``shortcut``: the class-token shortcut, as in
    :func:`clipcraft.encoding.resolve_shortcut` (None: wherever the image tower allows it).
    """
    settings = EncodeSettings(batch_size=batch_size, workers=workers, precision=precision, shortcut=shortcut)
    batches = iter_encoded(model, paths, settings)
    for batch in batches:
        failed = {bad.index: bad.reason for bad in batch.failed}
        yield EmbeddedBatch(batch.positions, batch.vectors, failed)
