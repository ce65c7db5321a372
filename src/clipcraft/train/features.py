"""Tower features for a whole dataset: batched extraction (bad images skipped and counted) and the on-disk
caches of a locked tower's features, memory-mapped and keyed by the tower's weights, its preprocessing and
the data: :class:`FeatureCache` by record (map-style data), :class:`CaptionFeatures` by caption text
(streamed shards, whose samples are not rows of a table)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clipcraft.data import BadItem, CaptionDataset
from clipcraft.digests import files_digest, json_digest, weights_digest
from clipcraft.encoding import EncodeSettings, encode_images, encode_texts
from clipcraft.errors import ClipcraftError
from clipcraft.files import atomic_dir
from clipcraft.model import ClipModel
from clipcraft.precision import Precision

if TYPE_CHECKING:  # the webdataset library is an extra: imported where shards are read
    from clipcraft.data.webdataset import WebDatasetStream

# -- the cache ----------------------------------------------------------------------------------------------


def cache_key(model: ClipModel, dataset: CaptionDataset, tower: str, settings: EncodeSettings) -> str:
    """Changes when the tower's weights, its preprocessing or settings, the data files or the encoding's
    :meth:`~clipcraft.encoding.EncodeSettings.key` (output kind, precision) change."""
    if tower == "image":
        data = files_digest([record.image for record in dataset.records])
    else:
        data = json_digest([r.captions for r in dataset.records])
    return _key(model, tower, settings, data)


def _key(model: ClipModel, tower: str, settings: EncodeSettings, data: str) -> str:
    """24 hex digits over the tower's settings and weights, the encoding's key and ``data`` (a digest)."""
    if tower == "image":
        tower_settings = {"tower": model.config.image.name, "preprocess": model.config.image.preprocess}
        module: torch.nn.Module = model.image_tower
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
    parts = {
        "tower_settings": tower_settings,
        **settings.key(),
        "data": data,
        "weights": weights_digest(module),
    }
    return json_digest(parts)[:24]


def _gather(features: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """(len(rows), F) float32 rows of a (memory-mapped) feature array, in a tensor of their own."""
    return torch.from_numpy(np.ascontiguousarray(features[rows]))


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
        return _gather(self.features, image_indices.numpy())

    def caption_rows(self, image_indices: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
        """(B*k, F) features of k captions per image: rows i*k ... i*k+k-1 are captions ``first[i]``,
        ``first[i] + 1``, ... of image ``image_indices[i]``, wrapping around its own caption count (an
        image with fewer than k captions repeats them)."""
        assert self.offsets is not None, "caption rows exist only in a text cache"
        idx = image_indices.numpy()
        counts = np.diff(np.append(self.offsets, len(self.features)))[idx]
        steps = np.arange(k)[None, :]
        rows = self.offsets[idx][:, None] + (first.numpy()[:, None] + steps) % counts[:, None]
        return _gather(self.features, rows.reshape(-1))


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
    settings = _settings(batch_size, num_workers, precision, progress)
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
    arrays = {"features": feats, "ok": ok, **({"offsets": offsets} if offsets is not None else {})}
    _write(folder, {"tower": tower}, arrays)
    return _open(folder), bad, False


def _settings(batch_size: int, num_workers: int, precision: Precision, progress: bool) -> EncodeSettings:
    """How a cache's features are encoded: raw tower features, in ``precision``, captions 4x as batched."""
    return EncodeSettings(
        output="features",
        precision=precision,
        batch_size=batch_size,
        text_batch_size=batch_size * 4,
        workers=num_workers,
        progress=progress,
    )


def _write(folder: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """``<name>.npy`` per array and ``meta.json`` (``meta`` plus the features' rows and dim), in ``folder``.
    Atomic: a killed run never leaves a half-written cache that looks complete (readers test meta.json)."""
    feats = arrays["features"]
    with atomic_dir(folder) as tmp:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "meta.json").write_text(
            json.dumps({**meta, "rows": int(len(feats)), "dim": int(feats.shape[1])})
        )


def _open(folder: Path) -> FeatureCache:
    offsets = folder / "offsets.npy"
    return FeatureCache(
        features=np.load(folder / "features.npy", mmap_mode="r"),
        ok=np.load(folder / "ok.npy"),
        offsets=np.load(offsets) if offsets.is_file() else None,
    )


# -- the caption-keyed cache of streamed shards ----------------------------------------------------------------


def caption_keys(captions: Sequence[str]) -> np.ndarray:
    """(N,) int64 keys of ``captions``: the first 8 bytes of each one's BLAKE2b digest (of its UTF-8 text),
    the same in every process and Python version (unlike ``hash()`` of a string)."""
    keys = [
        int.from_bytes(hashlib.blake2b(c.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        for c in captions
    ]
    return np.array(keys, dtype=np.uint64).view(np.int64)


@dataclass
class CaptionFeatures:
    """Features of a locked text tower keyed by caption text, memory-mapped from
    ``<cache_dir>/captions-<key>/``: row ``i`` of ``features`` (N, F) float32 is the caption whose
    :func:`caption_keys` key is ``keys[i]`` ((N,) int64, ascending, no two alike)."""

    keys: np.ndarray
    features: np.ndarray
    folder: Path

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> CaptionFeatures:
        """The cache written in ``folder`` by :func:`build_or_load_caption_cache`."""
        folder = Path(folder)
        return cls(np.load(folder / "keys.npy"), np.load(folder / "features.npy", mmap_mode="r"), folder)

    def rows(self, captions: Sequence[str], where: Sequence[str]) -> np.ndarray:
        """(len(captions),) int64 rows of ``captions`` in :attr:`features`; ``where[i]`` names the sample of
        caption ``i``. A caption that is not cached raises :class:`ClipcraftError` naming it and its sample:
        its feature is never guessed."""
        keys = caption_keys(captions)
        rows = np.searchsorted(self.keys, keys)
        found = self.keys[np.minimum(rows, len(self.keys) - 1)] == keys
        if not found.all():
            i = int(np.flatnonzero(~found)[0])
            raise ClipcraftError(
                f"The caption {captions[i]!r} of {where[i]} is not in the text feature cache {self.folder} "
                f"({int((~found).sum())} of this batch's {len(captions)} captions are not): the shards changed "
                "after the cache was built (it is keyed on the shard names and, for local shards, the sha256 "
                "in their manifest.json or their sizes and dates). Delete that folder to build the cache "
                "again, or train with feature_cache=false."
            )
        return rows.astype(np.int64)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """(B*k, F) features of (B, k) ``rows``: rows i*k ... i*k+k-1 are image i's k captions, the layout
        :meth:`FeatureCache.caption_rows` gives map-style data."""
        return _gather(self.features, rows.reshape(-1).numpy())


def build_or_load_caption_cache(
    model: ClipModel,
    stream: WebDatasetStream,
    cache_dir: str | os.PathLike[str],
    *,
    batch_size: int,
    num_workers: int,
    precision: Precision,
    progress: bool,
) -> tuple[CaptionFeatures, bool]:
    """The caption-keyed text cache of ``stream``'s shards (all of them, whatever the rank), written
    atomically when missing: one pass reads the captions of every sample (no image is decoded), and
    :mod:`clipcraft.encoding` encodes each distinct caption once (tower features, in ``precision``).

    Keyed like :func:`cache_key`, with :meth:`~clipcraft.data.webdataset.WebDatasetStream.digest` (the shard
    list, manifest checksums or file stamps) as the data. Returns ``(cache, whether it was loaded from
    disk)``. Raises :class:`ClipcraftError` when the shards hold no readable sample.
    """
    settings = _settings(batch_size, num_workers, precision, progress)
    folder = Path(cache_dir) / f"captions-{_key(model, 'text', settings, stream.digest())}"
    if (folder / "meta.json").is_file():
        return CaptionFeatures.open(folder), True
    captions = sorted({c for group in stream.all_captions() for c in group})  # sorted: the same on every run
    if not captions:
        raise ClipcraftError(f"The shards {stream.source} hold no readable sample to cache captions of.")
    keys = caption_keys(captions)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    if (np.diff(keys) == 0).any():  # odds about n^2 / 2^65: 3e-8 for a million captions
        raise ClipcraftError(
            f"Two of the {len(captions)} captions of {stream.source} share a cache key; train with "
            "feature_cache=false."
        )
    feats = encode_texts(model, [captions[i] for i in order], settings).vectors  # (N, F)
    _write(
        folder,
        {"tower": "text", "keyed_by": "caption", "shards": len(stream.shards)},
        {"features": feats, "keys": keys},
    )
    return CaptionFeatures.open(folder), False
