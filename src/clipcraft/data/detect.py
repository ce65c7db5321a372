"""Finding a dataset's format from its path, and opening any supported dataset with one call.

Detection rules, first match wins:

- a brace pattern (``shards-{000..009}.tar``), sources joined by ``::``, a ``pipe:`` command or URL, a glob of
  tar files, a ``.tar``/``.tar.gz`` file or a folder of them → ``webdataset``
- a folder with ``captions.txt`` (or that file itself) → ``flickr``
- a folder with ``metadata.jsonl``/``metadata.csv``, directly or in train/validation/test subfolders →
  ``imagefolder``
- a ``.json`` file with ``images`` and ``annotations`` lists → ``coco``
- a ``.csv``, ``.tsv``, ``.jsonl`` or ``.ndjson`` file → ``table``
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipcraft.data.coco import is_coco_document, read_coco
from clipcraft.data.dataset import CaptionDataset, ImageTransform, TextTransform
from clipcraft.data.flickr import CAPTIONS_FILE, read_flickr
from clipcraft.data.imagefolder import imagefolder_splits, read_imagefolder
from clipcraft.data.table import TABLE_SUFFIXES, read_table
from clipcraft.data.webdataset import WebDatasetStream, _is_shard_name, is_shard_spec
from clipcraft.errors import ClipcraftError, unknown_name

FORMATS = ("flickr", "table", "coco", "imagefolder", "webdataset")
FORMAT_ALIASES = {
    "flickr8k": "flickr",
    "flickr30k": "flickr",
    "csv": "table",
    "tsv": "table",
    "jsonl": "table",
    "wds": "webdataset",
    "hf": "imagefolder",
}

AnyCaptionDataset = CaptionDataset | WebDatasetStream


def canonical_format(name: str) -> str:
    """The format for ``name`` or one of its aliases; raises UnknownNameError listing the known formats."""
    key = name.lower()
    key = FORMAT_ALIASES.get(key, key)
    if key not in FORMATS:
        raise unknown_name("dataset format", name, [*FORMATS, *FORMAT_ALIASES])
    return key


def detect_format(path: str | os.PathLike) -> str:
    """The format of the dataset at ``path`` (one of :data:`FORMATS`), by the rules in the module docstring.

    Raises :class:`ClipcraftError` when the path does not exist or matches no rule, saying what was found.
    """
    text = os.fspath(path)
    if is_shard_spec(text):
        return "webdataset"
    p = Path(text)
    if p.is_dir():
        if (p / CAPTIONS_FILE).is_file():
            return "flickr"
        if imagefolder_splits(p):
            return "imagefolder"
        if any(child.is_file() and _is_shard_name(child.name) for child in p.iterdir()):
            return "webdataset"
        raise ClipcraftError(
            f"Cannot tell the dataset format of folder {p}: no captions.txt, no metadata.jsonl/metadata.csv and "
            f"no .tar shards. Pass format=, one of {', '.join(FORMATS)}."
        )
    if not p.is_file():
        raise ClipcraftError(f"Dataset not found: {p}")
    name = p.name.lower()
    if _is_shard_name(name):
        return "webdataset"
    if name == CAPTIONS_FILE:
        return "flickr"
    if name.endswith(".json"):
        try:
            with p.open("r", encoding="utf-8", errors="surrogateescape") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ClipcraftError(f"{p} is not valid JSON (line {exc.lineno}): {exc.msg}") from exc
        if is_coco_document(data):
            return "coco"
        raise ClipcraftError(f"{p} is JSON but not a COCO captions file ('images' and 'annotations' lists).")
    if name.endswith(TABLE_SUFFIXES):
        return "table"
    raise ClipcraftError(
        f"Cannot tell the dataset format of {p} from its name. Pass format=, one of {', '.join(FORMATS)}."
    )


def open_dataset(
    path: str | os.PathLike,
    format: str | None = None,
    split: str = "all",
    *,
    transform: ImageTransform | None = None,
    text_transform: TextTransform | None = None,
    **options: Any,
) -> AnyCaptionDataset:
    """Open the dataset at ``path``: a :class:`CaptionDataset` (map-style) or, for ``webdataset``, a
    :class:`WebDatasetStream`.

    ``format`` overrides detection (names or aliases from :data:`FORMATS`/:data:`FORMAT_ALIASES`). ``split``
    selects a split for ``flickr`` (train/dev/val/test) and ``imagefolder`` (train/validation/val/test); other
    formats accept only ``all``. ``options`` go to the reader (e.g. ``image_column``, ``caption_column``,
    ``image_root``, ``check_files``; ``seed``, ``shuffle``, ``shuffle_buffer``, ``rank``, ``world_size`` for
    webdataset); an option the reader does not take raises :class:`ClipcraftError`.
    """
    fmt = canonical_format(format) if format is not None else detect_format(path)
    if fmt not in ("flickr", "imagefolder") and split.lower() != "all":
        raise ClipcraftError(
            f"A {fmt} dataset has no splits, so split={split!r} cannot be applied to {os.fspath(path)}. "
            "Pass split='all', or point at the file (or shards) of that split."
        )
    reader: Callable[..., AnyCaptionDataset]
    if fmt == "flickr":
        reader, args = read_flickr, (path, split)
    elif fmt == "imagefolder":
        reader, args = read_imagefolder, (path, split)
    elif fmt == "table":
        reader, args = read_table, (path,)
    elif fmt == "coco":
        reader, args = read_coco, (path,)
    else:
        reader, args = WebDatasetStream, (path,)
        options = {"transform": transform, "text_transform": text_transform, **options}
    try:
        dataset = reader(*args, **options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise ClipcraftError(f"Option not accepted by the {fmt} reader: {exc}") from exc
        raise
    if isinstance(dataset, CaptionDataset):
        dataset = dataset.with_transforms(transform, text_transform)
    return dataset
