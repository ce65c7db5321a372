"""The cached features of augmented captions: a locked text tower's cache for the original captions plus one
for each of the run's ``text_augment_variants`` (see :mod:`clipcraft.data.text_augment`), read as one cache
whose rows show, per sample and epoch, the original caption or one of its variants."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from clipcraft.data import CaptionDataset, CaptionRecord
from clipcraft.data.text_augment import caption_variant, variant_choice
from clipcraft.train.features import FeatureCache


def variant_dataset(dataset: CaptionDataset, variant: int, strength: float, seed: int) -> CaptionDataset:
    """``dataset`` with every caption replaced by its variant ``variant`` (:func:`caption_variant`): the
    same images, in the same order, with the same number of captions each."""
    records = [
        CaptionRecord(r.image, tuple(caption_variant(c, variant, strength, seed) for c in r.captions))
        for r in dataset.records
    ]
    return CaptionDataset(
        records, source=dataset.source, format=dataset.format, split=f"{dataset.split}+variant{variant}"
    )


class CaptionVariantCache:
    """Text features of V+1 versions of every caption: ``caches[0]`` the original captions' cache, and
    ``caches[v]`` the cache of :func:`variant_dataset` ``v`` (same row layout). :meth:`caption_rows` reads
    the rows :meth:`FeatureCache.caption_rows` would, each from the version :func:`variant_choice` picks for
    (seed, epoch, image, caption); :meth:`set_epoch` says which epoch it is."""

    def __init__(self, caches: Sequence[FeatureCache], seed: int) -> None:
        if len(caches) < 2:
            raise ValueError("a variant cache needs the original captions' cache and at least one variant")
        self.caches = list(caches)
        self.seed = seed
        self.epoch = 0

    @property
    def variants(self) -> int:
        return len(self.caches) - 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def choices(self, image_indices: torch.Tensor, first: torch.Tensor, k: int) -> np.ndarray:
        """(B*k,) the version shown in each row of :meth:`caption_rows`; row i*k + s is keyed by image
        ``image_indices[i]`` and caption ``first[i] + s`` (before wrapping round the image's captions), so
        k = 1 is keyed like the loader's on-the-fly augmentation."""
        images = image_indices.numpy().repeat(k)
        captions = (first.numpy()[:, None] + np.arange(k)[None, :]).reshape(-1)
        return variant_choice(self.seed, self.epoch, images, captions, self.variants)

    def caption_rows(self, image_indices: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
        """(B*k, F) features of k captions per image, laid out as :meth:`FeatureCache.caption_rows`, each
        row from the cache of the version :meth:`choices` picks."""
        images = image_indices.repeat_interleave(k)
        captions = (first[:, None] + torch.arange(k)[None, :]).reshape(-1)
        choice = torch.from_numpy(self.choices(image_indices, first, k))
        features = self.caches[0].features  # (rows, F), memory-mapped
        dtype = torch.from_numpy(np.empty(0, dtype=features.dtype)).dtype
        out = torch.empty((len(choice), features.shape[1]), dtype=dtype)
        for version, cache in enumerate(self.caches):
            rows = (choice == version).nonzero().flatten()
            if len(rows):  # caption_rows with k = 1 wraps round each image's own caption count
                out[rows] = cache.caption_rows(images[rows], captions[rows], 1)
        return out
