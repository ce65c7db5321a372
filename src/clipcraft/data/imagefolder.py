"""Reader for Hugging Face style image folders: images beside a ``metadata.jsonl`` or ``metadata.csv``.

Layouts::

    root/metadata.jsonl                    {"file_name": "a.jpg", "text": "a caption"} per line
    root/a.jpg

    root/train/metadata.csv                split subfolders: train/, validation/ (or val/, valid/, dev/), test/
    root/validation/metadata.jsonl

``file_name`` is relative to the metadata file's folder. The columns are found as in
:mod:`clipcraft.data.table` (``file_name``/``image``/… and ``text``/``caption``/…); a JSONL caption may be a
list. ``split`` picks a split subfolder (``val``/``dev`` are aliases of ``validation``), and ``all`` reads every
metadata file. A metadata file directly in ``root`` is the ``train`` split, as in Hugging Face ``datasets``.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipcraft.data.dataset import CaptionDataset, CaptionRecord
from clipcraft.data.report import BadDataReport
from clipcraft.data.table import build_records, iter_table_rows, require_records
from clipcraft.errors import ClipcraftError, unknown_name

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGEFOLDER_SPLITS = ("train", "validation", "test")
_SPLIT_DIRS = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid", "dev"),
    "test": ("test", "testing"),
}
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


def find_metadata(folder: Path) -> Path | None:
    """The metadata file of ``folder`` (``metadata.jsonl`` preferred over ``metadata.csv``), or None."""
    for name in METADATA_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def imagefolder_splits(root: Path) -> dict[str, Path]:
    """Map each split found under ``root`` to its metadata file (``train`` for one directly in ``root``)."""
    found: dict[str, Path] = {}
    for split, dirnames in _SPLIT_DIRS.items():
        for dirname in dirnames:
            meta = find_metadata(root / dirname)
            if meta is not None:
                found[split] = meta
                break
    top = find_metadata(root)
    if top is not None and "train" not in found:
        found["train"] = top
    return found


def read_imagefolder(
    root: str | os.PathLike,
    split: str = "all",
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    check_files: bool = True,
) -> CaptionDataset:
    """Read an image folder with metadata into a :class:`CaptionDataset`, one record per image.

    Raises :class:`ClipcraftError` when no metadata file is found or the requested split is absent (listing
    the splits present), and :class:`~clipcraft.errors.UnknownNameError` for an unknown split name.
    """
    root = Path(root)
    if root.is_file():  # a metadata file itself
        root = root.parent
    name = SPLIT_ALIASES.get(split.lower(), split.lower())
    if name not in (*IMAGEFOLDER_SPLITS, "all"):
        raise unknown_name("image-folder split", split, [*IMAGEFOLDER_SPLITS, *SPLIT_ALIASES, "all"])
    splits = imagefolder_splits(root)
    if not splits:
        raise ClipcraftError(
            f"No metadata.jsonl or metadata.csv in {root} or its train/validation/test folders."
        )
    if name == "all":
        chosen = list(splits.values())
    elif name in splits:
        chosen = [splits[name]]
    else:
        raise ClipcraftError(
            f"{root} has no {name!r} split; it has {sorted(splits)}. Use one of those or 'all'."
        )
    report = BadDataReport(f"{root} [{name}]")
    records: list[CaptionRecord] = []
    for meta in chosen:
        records += build_records(
            iter_table_rows(meta),
            path=meta,
            image_root=meta.parent,
            report=report,
            image_column=image_column,
            caption_column=caption_column,
            check_files=check_files,
        )
    require_records(records, report, root)
    return CaptionDataset(records, report=report, source=str(root), format="imagefolder", split=name)
