"""The map-style caption dataset every file-based reader returns, its items, and the collate function.

A :class:`CaptionDataset` is a table of :class:`CaptionRecord` rows grouped by image: one row per image with all
of its captions. Indexing it with ``(image_index, caption_index)`` (what
:class:`~clipcraft.data.sampler.CaptionGroupedBatchSampler` yields) loads the image, applies the injected image
transform and returns a :class:`CaptionItem` ``(image, caption, index)``. Tokenizing is left to the collate
function (:class:`CaptionCollate` takes the text tower's tokenizer), so the dataset needs no tokenizer.

Bad images never raise out of ``__getitem__``: the strategy is *drop and count*. A decode failure returns a
:class:`~clipcraft.data.report.BadItem` in place of the item; :func:`collate` drops it from the batch and keeps
it in :attr:`CaptionBatch.bad`, so the training loop (in the main process, whatever the number of DataLoader
workers) can add it to its run report with ``report.record_batch(len(batch), batch.bad)``. A batch can therefore
be shorter than the sampler's batch size, and can be empty (``len(batch) == 0``) when every item was bad.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from clipcraft.data.decode import BadImageError, decode_image
from clipcraft.data.report import BadDataReport, BadItem

ImageTransform = Callable[
    [Image.Image], Any
]  # PIL RGB image -> tensor (C, H, W), e.g. from timm's data config
TextTransform = Callable[[str], str]  # caption -> caption, e.g. a prompt template or normalisation


@dataclass(frozen=True)
class CaptionRecord:
    """One image and all of its captions. ``image`` is a file path (absolute or as given by the reader)."""

    image: str
    captions: tuple[str, ...]


class CaptionItem(NamedTuple):
    """One loaded pair: the transformed image (a PIL image when there is no transform), the caption text, and
    the image's index in the dataset (a stable sample id for streams)."""

    image: Any
    caption: str
    index: int


class CaptionDataset(Dataset):
    """Images with their captions, grouped by image; ``len()`` is the number of images.

    ``dataset[i]`` returns caption 0 of image ``i``; ``dataset[i, j]`` caption ``j``. Either returns a
    :class:`CaptionItem`, or a :class:`BadItem` when the image cannot be loaded (see the module docstring).
    ``report`` holds the problems found while the index was built (rows that never made it into ``records``);
    ``load_report`` counts items loaded and bad images met by this process's ``__getitem__`` calls.
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        *,
        transform: ImageTransform | None = None,
        text_transform: TextTransform | None = None,
        report: BadDataReport | None = None,
        source: str = "",
        format: str = "",
        split: str = "all",
    ) -> None:
        self.records: tuple[CaptionRecord, ...] = tuple(records)
        self.transform = transform
        self.text_transform = text_transform
        self.source = source
        self.format = format
        self.split = split
        self.report = report if report is not None else BadDataReport(source)
        self.load_report = BadDataReport(source)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_captions(self) -> int:
        """Total number of image–caption pairs."""
        return sum(len(r.captions) for r in self.records)

    def caption_counts(self) -> list[int]:
        """Number of captions of each image, in index order (what the batch sampler needs)."""
        return [len(r.captions) for r in self.records]

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of record ``index``, untransformed; raises :class:`BadImageError` when unusable."""
        return decode_image(self.records[index].image)

    def __getitem__(self, key: int | tuple[int, int]) -> CaptionItem | BadItem:
        index, caption_index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        record = self.records[index]
        self.load_report.seen()
        try:
            image = decode_image(record.image)
        except BadImageError as exc:
            bad = BadItem(index, exc.kind, exc.where, exc.reason)
            self.load_report.add_item(bad)
            return bad
        caption = record.captions[caption_index]
        if self.text_transform is not None:
            caption = self.text_transform(caption)
        if self.transform is not None:
            image = self.transform(image)
        return CaptionItem(image, caption, index)

    def with_transforms(
        self, transform: ImageTransform | None = None, text_transform: TextTransform | None = None
    ) -> CaptionDataset:
        """A copy sharing the records and index report, with the given transforms and a fresh load report."""
        clone = copy.copy(self)
        clone.transform = transform
        clone.text_transform = text_transform
        clone.load_report = BadDataReport(self.source)
        return clone

    def subset(self, indices: Sequence[int]) -> CaptionDataset:
        """A dataset of the records at ``indices`` (same transforms and index report)."""
        clone = copy.copy(self)
        clone.records = tuple(self.records[i] for i in indices)
        clone.load_report = BadDataReport(self.source)
        return clone

    def __repr__(self) -> str:
        return (
            f"CaptionDataset(format={self.format!r}, split={self.split!r}, images={len(self)}, "
            f"captions={self.num_captions}, bad_rows={self.report.num_bad}, source={self.source!r})"
        )


@dataclass
class CaptionBatch:
    """A collated batch: ``images`` (B, C, H, W) when the items were tensors (else a list of what they were),
    ``captions`` the B caption strings, ``indices`` (B,) int64 image indices, ``tokens`` whatever the collate's
    tokenizer returned for the captions (None without one), and ``bad`` the items dropped from this batch."""

    images: Any
    captions: list[str]
    indices: torch.Tensor
    tokens: Any = None
    bad: tuple[BadItem, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> CaptionBatch:
        """Called by DataLoader(pin_memory=True)."""
        images = self.images.pin_memory() if isinstance(self.images, torch.Tensor) else self.images
        tokens = self.tokens
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.pin_memory()
        elif isinstance(tokens, dict):
            tokens = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in tokens.items()}
        return CaptionBatch(images, self.captions, self.indices.pin_memory(), tokens, self.bad)


Tokenizer = Callable[[list[str]], Any]


def collate(items: Sequence[CaptionItem | BadItem], tokenize: Tokenizer | None = None) -> CaptionBatch:
    """Stack the good items into a :class:`CaptionBatch`, dropping bad ones into ``batch.bad``.

    Image tensors of equal shape are stacked to (B, C, H, W); otherwise (PIL images, or no good items) the
    images stay a list. ``tokenize``, if given, is called once on the list of captions (also when it is empty).
    """
    good = [it for it in items if not isinstance(it, BadItem)]
    bad = tuple(it for it in items if isinstance(it, BadItem))
    images: Any = [it[0] for it in good]
    if images and all(isinstance(im, torch.Tensor) for im in images):
        images = torch.stack(images)  # (B, C, H, W)
    captions = [it[1] for it in good]
    indices = torch.tensor([it[2] for it in good], dtype=torch.int64)
    tokens = tokenize(captions) if tokenize is not None else None
    return CaptionBatch(images, captions, indices, tokens, bad)


class CaptionCollate:
    """A picklable collate function for DataLoader workers: :func:`collate` with an optional tokenizer
    (a callable from a list of captions to the tensors the text tower takes)."""

    def __init__(self, tokenize: Tokenizer | None = None) -> None:
        self.tokenize = tokenize

    def __call__(self, items: Sequence[CaptionItem | BadItem]) -> CaptionBatch:
        return collate(items, self.tokenize)
