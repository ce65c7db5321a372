"""Embedding image files for an index: a multi-worker loader feeding the model in batches.

Unreadable files do not stop the run: the loader marks them, the batch goes on without them, and the caller
gets their names and reasons back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipcraft.errors import ClipcraftError, ImageLoadError
from clipcraft.images import load_image
from clipcraft.precision import resolve_precision


def default_workers() -> int:
    """Loader processes: half the CPUs (at least 1, at most 8); the other half run the model."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def model_identity(model: Any) -> str:
    """A digest that names a model: sha256 over its config (JSON, sorted keys) and every weight tensor.

    Two models share an identity only when they have the same architecture, preprocessing and weights, so an
    index can refuse queries embedded by another model. Costs one pass over the weights (about 1 s per GB).
    """
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Files(torch.utils.data.Dataset):
    """Paths -> (position, pixels, error message or ""); an unreadable file gets zero pixels and its error."""

    def __init__(self, paths: Sequence[str], transform: Any, size: tuple[int, int, int]) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            return i, self.transform(load_image(self.paths[i])), ""
        except ImageLoadError as exc:
            return i, torch.zeros(self.size), str(exc)
        except Exception as exc:  # a transform failing on a decodable but odd image: skip it, say why
            return i, torch.zeros(self.size), f"Could not preprocess {self.paths[i]}: {exc}"


def _collate(items: list[tuple[int, torch.Tensor, str]]) -> tuple[list[int], torch.Tensor, list[str]]:
    positions = [i for i, _, _ in items]
    return positions, torch.stack([x for _, x, _ in items]), [e for _, _, e in items]


@dataclass
class EmbeddedBatch:
    """Embeddings of one loader batch: ``positions`` index the input paths; ``failed`` maps positions to errors."""

    positions: list[int]
    embeddings: np.ndarray  # (len(positions), D) float32, unit rows
    failed: dict[int, str]


def embed_batch(model: Any, pixels: torch.Tensor, precision: str) -> np.ndarray:
    """(B, 3, H, W) pixels -> (B, D) float32 unit-norm embeddings (no gradients)."""
    with model.inference(precision):
        features = model.image_tower(pixels.to(model.device))  # (B, F)
        embeddings = model.embed_image_features(features)  # (B, D)
    return torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu().numpy()


def iter_embeddings(
    model: Any,
    paths: Sequence[str],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    precision: str = "auto",
) -> Iterator[EmbeddedBatch]:
    """Embed image files in batches, in input order, with ``workers`` loader processes (0: in this process).

    Yields one :class:`EmbeddedBatch` per loader batch; files that cannot be read or decoded appear in
    ``failed`` instead of ``positions``. The model is put in eval mode.
    """
    if batch_size < 1:
        raise ClipcraftError(f"batch_size must be >= 1, got {batch_size}.")
    if not paths:
        return
    workers = default_workers() if workers is None else max(0, int(workers))
    precision = resolve_precision(precision, model.device)
    model.eval()
    size = tuple(model.image_tower.preprocess.input_size)
    loader = torch.utils.data.DataLoader(
        _Files(paths, model.image_transform(train=False), size),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    for positions, pixels, errors in loader:
        ok = [j for j, e in enumerate(errors) if not e]
        failed = {positions[j]: errors[j] for j, e in enumerate(errors) if e}
        if ok:
            vectors = embed_batch(model, pixels[ok] if len(ok) < len(positions) else pixels, precision)
        else:
            vectors = np.zeros((0, model.embed_dim), dtype=np.float32)
        yield EmbeddedBatch([positions[j] for j in ok], vectors, failed)
