"""Reader for Flickr8k / Flickr30k style folders: ``captions.txt``, ``images/`` and the official split files.

Layout::

    root/captions.txt          CSV, header ``image,caption``; captions with commas are double-quoted
    root/images/<name>.jpg     (``Images/`` or the folder itself also work)
    root/splits/train.txt      one image file name per line; also dev.txt (or val.txt) and test.txt

The original Flickr8k split names (``Flickr_8k.trainImages.txt`` …, in ``root`` or ``root/splits``) are found
too. ``split`` is ``train``, ``dev`` (aliases ``val``, ``validation``), ``test``, or ``all`` for every captioned
image regardless of the split files. Images listed in the split file but without any caption are counted as
``incomplete_sample``; the other bad rows are counted as in :mod:`clipcraft.data.table`.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipcraft.data.dataset import CaptionDataset
from clipcraft.data.report import INCOMPLETE_SAMPLE, BadDataReport
from clipcraft.data.table import build_records, iter_table_rows, require_records
from clipcraft.errors import ClipcraftError, unknown_name

CAPTIONS_FILE = "captions.txt"
FLICKR_SPLITS = ("train", "dev", "test")
SPLIT_ALIASES = {"val": "dev", "validation": "dev", "valid": "dev"}
_IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "flickr30k_images")


def canonical_flickr_split(split: str) -> str:
    """``train``/``dev``/``test``/``all`` for a split name or alias; raises UnknownNameError otherwise."""
    name = SPLIT_ALIASES.get(split.lower(), split.lower())
    if name not in (*FLICKR_SPLITS, "all"):
        raise unknown_name("Flickr split", split, [*FLICKR_SPLITS, *SPLIT_ALIASES, "all"])
    return name


def _split_file(root: Path, split: str) -> Path | None:
    names = [f"{split}.txt"] + (["val.txt", "validation.txt"] if split == "dev" else [])
    names.append(f"Flickr_8k.{split}Images.txt")
    for folder in (root / "splits", root):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def read_split_file(path: Path) -> list[str]:
    """The image file names listed in a split file, one per line, blank lines skipped, order kept."""
    with path.open("r", encoding="utf-8-sig", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def _image_dir(root: Path) -> Path:
    for name in _IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    return root


def read_flickr(
    root: str | os.PathLike,
    split: str = "all",
    *,
    image_dir: str | os.PathLike | None = None,
    check_files: bool = True,
) -> CaptionDataset:
    """Read a Flickr8k/30k folder (or its ``captions.txt``) into a :class:`CaptionDataset`, one record per image.

    ``split`` selects the images of an official split file, in the caption file's order. Raises
    :class:`ClipcraftError` when ``captions.txt`` or the requested split file is missing, and
    :class:`~clipcraft.errors.UnknownNameError` for an unknown split name.
    """
    root = Path(root)
    captions_path = root if root.is_file() else root / CAPTIONS_FILE
    root = captions_path.parent
    if not captions_path.is_file():
        raise ClipcraftError(
            f"No {CAPTIONS_FILE} in {root}; a Flickr folder needs one (header 'image,caption')."
        )
    split = canonical_flickr_split(split)
    wanted: list[str] | None = None
    if split != "all":
        split_path = _split_file(root, split)
        if split_path is None:
            raise ClipcraftError(
                f"No split file for {split!r} in {root / 'splits'} (expected {split}.txt); "
                "use split='all' or add the official split files."
            )
        wanted = read_split_file(split_path)
    wanted_set = set(wanted) if wanted is not None else None
    images = Path(image_dir) if image_dir is not None else _image_dir(root)
    report = BadDataReport(f"{captions_path} [{split}]")
    names_seen: set[str] = set()
    records = build_records(
        iter_table_rows(captions_path, ","),
        path=captions_path,
        image_root=images,
        report=report,
        image_column="image",
        caption_column="caption",
        check_files=check_files,
        keep=None
        if wanted_set is None
        else (lambda name: name in wanted_set or Path(name).name in wanted_set),
        names_seen=names_seen,
    )
    if wanted is not None:
        captioned = names_seen | {Path(n).name for n in names_seen}
        for name in wanted:
            if name not in captioned:
                report.seen()
                report.add(
                    INCOMPLETE_SAMPLE, f"{split_path}: {name}", "listed in the split file but has no caption"
                )
    require_records(records, report, captions_path)
    return CaptionDataset(records, report=report, source=str(root), format="flickr", split=split)
