"""Reading image–caption data for training: one reader per format, the caption-grouped sampler, bad-data reports.

Typical use::

    from clipcraft.data import CaptionCollate, CaptionGroupedBatchSampler, open_dataset, validate

    dataset = open_dataset("../shared/data/flickr8k", split="train", transform=image_transform)
    validate(dataset)  # raises BadDataError when over 5% of the pairs are bad
    sampler = CaptionGroupedBatchSampler(dataset, batch_size=256, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=CaptionCollate(tokenizer), num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:  # batch.images (B, C, H, W), batch.captions, batch.bad (dropped items)
            report.record_batch(len(batch), batch.bad)
"""

from __future__ import annotations

from clipcraft.data.coco import read_coco
from clipcraft.data.dataset import (
    CaptionBatch,
    CaptionCollate,
    CaptionDataset,
    CaptionItem,
    CaptionRecord,
    collate,
)
from clipcraft.data.decode import BadImageError, check_image, decode_image
from clipcraft.data.detect import FORMATS, canonical_format, detect_format, open_dataset
from clipcraft.data.flickr import read_flickr
from clipcraft.data.imagefolder import read_imagefolder
from clipcraft.data.report import KINDS, BadDataError, BadDataReport, BadItem
from clipcraft.data.sampler import CaptionGroupedBatchSampler
from clipcraft.data.table import read_table
from clipcraft.data.validate import validate
from clipcraft.data.webdataset import ShardBatches, StreamPlan, WebDatasetStream, expand_braces, list_shards

__all__ = [
    "FORMATS",
    "KINDS",
    "BadDataError",
    "BadDataReport",
    "BadImageError",
    "BadItem",
    "CaptionBatch",
    "CaptionCollate",
    "CaptionDataset",
    "CaptionGroupedBatchSampler",
    "CaptionItem",
    "CaptionRecord",
    "ShardBatches",
    "StreamPlan",
    "WebDatasetStream",
    "canonical_format",
    "check_image",
    "collate",
    "decode_image",
    "detect_format",
    "expand_braces",
    "list_shards",
    "open_dataset",
    "read_coco",
    "read_flickr",
    "read_imagefolder",
    "read_table",
    "validate",
]
