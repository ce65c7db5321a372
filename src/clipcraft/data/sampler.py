"""The caption-grouped batch sampler: one caption per image per epoch, never the same image twice in a batch.

A contrastive loss treats every other pair in the batch as a negative, so two captions of one image in a batch
would be false negatives. Sampling images (not caption rows) rules that out: each epoch is a permutation of the
images, and each image brings one of its captions, drawn from (seed, epoch). Over epochs every caption gets used.

Distributed: the permutation is the same on every rank; rank ``r`` takes positions ``r, r + R, r + 2R, …``
(as torch's ``DistributedSampler`` does), so at step ``s`` the R ranks together hold one contiguous slice of the
permutation and the gathered global batch has no repeated image either. With ``drop_last=True`` (the default,
for training) the epoch is cut to a multiple of ``batch_size * R`` so every rank yields the same number of full
batches; with ``drop_last=False`` it is padded by repeating its first images up to a multiple of R, and each
rank's last batch may be short.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from clipcraft.distributed import rank_and_world_size
from clipcraft.errors import ClipcraftError

Batch = list[tuple[int, int]]  # (image index, caption index) pairs, what CaptionDataset.__getitem__ takes


class CaptionGroupedBatchSampler(Sampler[Batch]):
    """Yields batches of ``(image_index, caption_index)`` for one rank, deterministic in (seed, epoch, rank).

    ``caption_counts`` is the number of captions of each image (``dataset.caption_counts()``), or the dataset.
    ``num_replicas``/``rank`` default to torch.distributed's when it is initialized, else 1/0.
    :meth:`set_epoch` selects the epoch and, for a resumed run, how many of this epoch's batches to skip, so the
    run continues with exactly the batches it had not yet seen. Raises :class:`ClipcraftError` when, with
    ``drop_last``, the data does not fill one global batch.
    """

    def __init__(
        self,
        caption_counts: Sequence[int] | object,
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        counts_fn = getattr(caption_counts, "caption_counts", None)
        counts = np.asarray(counts_fn() if callable(counts_fn) else caption_counts, dtype=np.int64)
        if counts.ndim != 1 or counts.size == 0:
            raise ClipcraftError("The batch sampler needs at least one image.")
        if (counts < 1).any():
            raise ClipcraftError(
                f"Image {int(np.argmin(counts))} has no caption; every image needs at least one."
            )
        if batch_size < 1:
            raise ClipcraftError(f"batch_size must be at least 1, got {batch_size}.")
        rank, num_replicas = rank_and_world_size(rank, num_replicas)
        if not 0 <= rank < num_replicas:
            raise ClipcraftError(f"rank must be in [0, {num_replicas}), got {rank}.")
        if seed < 0:
            raise ClipcraftError(f"seed must be non-negative, got {seed}.")
        self.counts = counts
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0
        if drop_last and self.batches_per_epoch == 0:
            raise ClipcraftError(
                f"{counts.size} images do not fill one global batch of {batch_size} x {num_replicas} ranks; "
                "use a smaller batch size or drop_last=False."
            )

    @property
    def num_images(self) -> int:
        return int(self.counts.size)

    @property
    def samples_per_rank(self) -> int:
        """Images this rank sees in a full epoch."""
        n, r = self.num_images, self.num_replicas
        if self.drop_last:
            return (n // (self.batch_size * r)) * self.batch_size
        return math.ceil(n / r)

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a full epoch (the same on every rank)."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use ``epoch``'s order from now on, skipping its first ``start_batch`` batches (to resume mid-epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ClipcraftError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}.")
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This rank's image indices for a full epoch, in order, and the caption index chosen for every image
        of the dataset (the same on all ranks)."""
        epoch = self.epoch if epoch is None else epoch
        n, r = self.num_images, self.num_replicas
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        captions = rng.integers(0, self.counts)  # one draw per image, in [0, count)
        if self.drop_last:
            order = order[: self.samples_per_rank * r]
        else:
            order = np.resize(order, self.samples_per_rank * r)  # pads by repeating from the start
        return order[self.rank :: r], captions

    def __iter__(self) -> Iterator[Batch]:
        mine, captions = self.epoch_plan()
        for b in range(self.start_batch, self.batches_per_epoch):
            chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(int(i), int(captions[i])) for i in chunk]

    def __len__(self) -> int:
        """Batches the next iteration yields: the epoch's batches minus those skipped by ``start_batch``."""
        return self.batches_per_epoch - self.start_batch
