"""Tower features for a whole dataset: batched extraction (bad images skipped and counted) and the on-disk
cache of a locked tower's features, memory-mapped and keyed by the tower's weights, its preprocessing and
the data files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipcraft.data import BadItem, CaptionDataset
from clipcraft.digests import files_digest, json_digest, weights_digest
from clipcraft.encoding import EncodeSettings, encode_images, encode_texts
from clipcraft.files import atomic_dir
from clipcraft.model import ClipModel
from clipcraft.precision import Precision

# -- the cache ----------------------------------------------------------------------------------------------


def cache_key(model: ClipModel, dataset: CaptionDataset, tower: str, settings: EncodeSettings) -> str:
    """Changes when the tower's weights, its preprocessing or settings, the data files or the encoding's
    :meth:`~clipcraft.encoding.EncodeSettings.key` (output kind, precision) change."""
    if tower == "image":
        tower_settings = {"tower": model.config.image.name, "preprocess": model.config.image.preprocess}
        module: torch.nn.Module = model.image_tower
        data = files_digest([record.image for record in dataset.records])
    else:
        text = model.config.text
        tower_settings = {
            "tower": text.name,
            "pooling": text.pooling,
            "max_length": text.max_length,
            "lowercase": text.lowercase,
            "normalize": text.normalize_features,
        }
        module = model.text_tower
        data = json_digest([r.captions for r in dataset.records])
    parts = {
        "tower_settings": tower_settings,
        **settings.key(),
        "data": data,
        "weights": weights_digest(module),
    }
    return json_digest(parts)[:24]


@dataclass
class FeatureCache:
    """Features of one locked tower for one dataset, memory-mapped from ``<cache_dir>/<tower>-<key>/``.

    Image caches have one row per image; text caches one row per caption, in record order
    (``offsets[i] + j`` is caption ``j`` of image ``i``). ``ok`` marks rows whose input could be loaded.
    """

    features: np.ndarray
    ok: np.ndarray
    offsets: np.ndarray | None = None

    def rows(self, image_indices: torch.Tensor) -> torch.Tensor:
        """(B, F) features of an image cache, one row per image."""
        assert self.offsets is None, "a text cache has one row per caption: use caption_rows"
        return torch.from_numpy(np.ascontiguousarray(self.features[image_indices.numpy()]))

    def caption_rows(self, image_indices: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
        """(B*k, F) features of k captions per image: rows i*k ... i*k+k-1 are captions ``first[i]``,
        ``first[i] + 1``, ... of image ``image_indices[i]``, wrapping around its own caption count (an
        image with fewer than k captions repeats them)."""
        assert self.offsets is not None, "caption rows exist only in a text cache"
        idx = image_indices.numpy()
        counts = np.diff(np.append(self.offsets, len(self.features)))[idx]
        steps = np.arange(k)[None, :]
        rows = self.offsets[idx][:, None] + (first.numpy()[:, None] + steps) % counts[:, None]
        return torch.from_numpy(np.ascontiguousarray(self.features[rows.reshape(-1)]))


def build_or_load_cache(
    model: ClipModel,
    dataset: CaptionDataset,
    tower: str,
    cache_dir: str | os.PathLike[str],
    *,
    batch_size: int,
    num_workers: int,
    precision: Precision,
    progress: bool,
) -> tuple[FeatureCache, list[BadItem], bool]:
    """The cache for ``tower`` ("image" or "text"), computed by :mod:`clipcraft.encoding` (tower features,
    in ``precision``) and written atomically when missing; bad images are :class:`BadItem` s whose ``index``
    is the record index.

    Returns ``(cache, bad items met while building, whether it was loaded from disk)``.
    """
    settings = EncodeSettings(
        output="features",
        precision=precision,
        batch_size=batch_size,
        text_batch_size=batch_size * 4,
        workers=num_workers,
        progress=progress,
    )
    folder = Path(cache_dir) / f"{tower}-{cache_key(model, dataset, tower, settings)}"
    if (folder / "meta.json").is_file():
        return _open(folder), [], True
    bad: list[BadItem] = []
    if tower == "image":
        encoded = encode_images(model, [record.image for record in dataset.records], settings)
        feats, ok, bad = encoded.dense(), encoded.ok, encoded.failed
        offsets = None
    else:
        captions = [c for r in dataset.records for c in r.captions]
        feats = encode_texts(model, captions, settings).vectors
        ok = np.ones(len(captions), dtype=bool)
        offsets = np.concatenate([[0], np.cumsum([len(r.captions) for r in dataset.records])[:-1]]).astype(
            np.int64
        )
    with atomic_dir(folder) as tmp:  # a killed run never leaves a half-written cache that looks complete
        np.save(tmp / "features.npy", feats)
        np.save(tmp / "ok.npy", ok)
        if offsets is not None:
            np.save(tmp / "offsets.npy", offsets)
        (tmp / "meta.json").write_text(
            json.dumps({"tower": tower, "rows": int(len(feats)), "dim": int(feats.shape[1])})
        )
    return _open(folder), bad, False


def _open(folder: Path) -> FeatureCache:
    offsets = folder / "offsets.npy"
    return FeatureCache(
        features=np.load(folder / "features.npy", mmap_mode="r"),
        ok=np.load(folder / "ok.npy"),
        offsets=np.load(offsets) if offsets.is_file() else None,
    )
