"""Labelled image sets for classification: a folder with one subfolder per class, or a CSV of image,label.

Layouts::

    root/<class>/*.jpg            one subfolder per class; the folder name is the class key
    labels.csv                    header with an image column and a label column; paths relative to the file

Class keys are sorted (folder names, or the CSV's distinct labels) and label ``i`` is ``keys[i]``. A class-name
file (see :func:`clipcraft.evaluation.zeroshot.read_classnames`, e.g. ``n01440764<TAB>tench``) maps keys to
readable names; without one the readable name is the key with ``_`` turned into spaces.

Files are listed, not decoded, here: an image that fails to decode is skipped and counted by the encoder
(:mod:`clipcraft.evaluation.embeddings`). A class folder with no image files is an error, since its classes'
recall would be undefined and a typo in the data layout should not pass silently.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipcraft.errors import ClipcraftError
from clipcraft.images import IMAGE_EXTENSIONS

# Column names tried, in order (case-insensitive), in a CSV of image,label.
IMAGE_COLUMNS = ("image", "file", "filename", "file_name", "path", "filepath", "image_path")
LABEL_COLUMNS = ("label", "class", "classname", "class_name", "category", "target")

# Split folder names recognised under a data root (``root/train/<class>``, ``root/test/<class>``).
SPLIT_FOLDERS = ("train", "val", "validation", "dev", "test")


@dataclass
class LabelledImages:
    """Image files with integer labels.

    ``paths`` (N,) file paths; ``labels`` (N,) int64 in ``0..C-1``; ``keys`` (C,) the class keys (folder names
    or CSV labels), sorted; ``classnames`` (C,) readable names used for prompts and tables; ``source`` the
    folder or file read.
    """

    paths: list[str]
    labels: np.ndarray
    keys: list[str]
    classnames: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.keys)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _readable(key: str) -> str:
    return key.replace("_", " ").strip()


def _names(keys: list[str], classnames_file: str | os.PathLike[str] | None) -> list[str]:
    if classnames_file is None:
        return [_readable(k) for k in keys]
    from clipcraft.evaluation.zeroshot import read_classnames

    return read_classnames(classnames_file, keys)


def _limit(paths_by_key: dict[str, list[str]], limit_per_class: int | None) -> dict[str, list[str]]:
    if limit_per_class is None:
        return paths_by_key
    if limit_per_class < 1:
        raise ClipcraftError(f"limit_per_class must be a positive integer; got {limit_per_class}.")
    return {k: v[:limit_per_class] for k, v in paths_by_key.items()}


def _build(
    paths_by_key: dict[str, list[str]], classnames_file: str | os.PathLike[str] | None, source: str
) -> LabelledImages:
    keys = sorted(paths_by_key)
    paths: list[str] = []
    labels: list[int] = []
    for i, key in enumerate(keys):
        paths += paths_by_key[key]
        labels += [i] * len(paths_by_key[key])
    return LabelledImages(
        paths, np.asarray(labels, dtype=np.int64), keys, _names(keys, classnames_file), source
    )


def read_class_folder(
    root: str | os.PathLike[str],
    classnames_file: str | os.PathLike[str] | None = None,
    *,
    limit_per_class: int | None = None,
) -> LabelledImages:
    """Read a folder with one subfolder of images per class (files sorted by name within a class).

    Image files are those with an extension in :data:`clipcraft.images.IMAGE_EXTENSIONS`; other files and
    hidden folders are ignored. ``limit_per_class`` keeps the first N files of each class (by name). Raises
    :class:`ClipcraftError` when ``root`` is missing, has no class subfolders, or a class folder holds no image.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise ClipcraftError(f"Image folder not found: {root_path}")
    class_dirs = sorted(d for d in root_path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ClipcraftError(
            f"{root_path} has no class subfolders; a classification folder holds one subfolder of images per "
            "class (e.g. cifar10/test/cat/*.jpg), or pass a CSV of image,label."
        )
    paths_by_key: dict[str, list[str]] = {}
    empty: list[str] = []
    for d in class_dirs:
        files = sorted(str(p) for p in d.iterdir() if _is_image(p))
        if not files:
            empty.append(d.name)
        paths_by_key[d.name] = files
    if empty:
        raise ClipcraftError(
            f"{len(empty)} class folder(s) in {root_path} hold no image files: {', '.join(empty[:5])}. "
            f"Add images (extensions {', '.join(IMAGE_EXTENSIONS)}) or remove the folder(s)."
        )
    return _build(_limit(paths_by_key, limit_per_class), classnames_file, str(root_path))


def _find_column(
    header: Sequence[str], wanted: tuple[str, ...], given: str | None, what: str, path: Path
) -> str:
    lowered = {h.strip().lower(): h for h in header}
    for name in (given,) if given else wanted:
        if name.lower() in lowered:
            return lowered[name.lower()]
    raise ClipcraftError(
        f"{path}: no {what} column; the header is {list(header)} and the {what} column must be one of "
        f"{list((given,) if given else wanted)}."
    )


def read_label_csv(
    path: str | os.PathLike[str],
    classnames_file: str | os.PathLike[str] | None = None,
    *,
    image_root: str | os.PathLike[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    limit_per_class: int | None = None,
) -> LabelledImages:
    """Read a CSV (or TSV, by extension) with a header holding an image column and a label column.

    Image paths are relative to ``image_root`` (default: the CSV's folder); absolute paths are kept. Rows keep
    file order within a class. Raises :class:`ClipcraftError` for a missing file, missing columns, a row with
    an empty image or label (naming the line), or no rows.
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        raise ClipcraftError(f"Label file not found: {csv_path}")
    base = Path(image_root) if image_root is not None else csv_path.parent
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    paths_by_key: dict[str, list[str]] = {}
    with csv_path.open("r", encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise ClipcraftError(f"{csv_path} is empty; it needs a header such as 'image,label'.")
        image_col = _find_column(reader.fieldnames, IMAGE_COLUMNS, image_column, "image", csv_path)
        label_col = _find_column(reader.fieldnames, LABEL_COLUMNS, label_column, "label", csv_path)
        for row in reader:
            image = (row.get(image_col) or "").strip()
            label = (row.get(label_col) or "").strip()
            if not image or not label:
                raise ClipcraftError(
                    f"{csv_path}:{reader.line_num}: empty {'image' if not image else 'label'} in {row}."
                )
            full = Path(image) if Path(image).is_absolute() else base / image
            paths_by_key.setdefault(label, []).append(str(full))
    if not paths_by_key:
        raise ClipcraftError(f"{csv_path} has a header but no rows.")
    return _build(_limit(paths_by_key, limit_per_class), classnames_file, str(csv_path))


def open_labelled(
    path: str | os.PathLike[str],
    classnames_file: str | os.PathLike[str] | None = None,
    *,
    split: str | None = None,
    limit_per_class: int | None = None,
) -> LabelledImages:
    """Open a labelled image set: a CSV/TSV file, or a class folder.

    With ``split``, a folder ``path/<split>`` is read (e.g. ``cifar10`` + ``test`` -> ``cifar10/test``).
    Without it, a folder whose subfolders are all split names (train/val/test...) is read at its ``test``
    split, so ``cifar10`` alone means ``cifar10/test``.
    """
    p = Path(path)
    if p.is_file():
        if split is not None:
            raise ClipcraftError(
                f"--split {split!r} applies to a folder of split folders, not to the file {p}."
            )
        return read_label_csv(p, classnames_file, limit_per_class=limit_per_class)
    if not p.is_dir():
        raise ClipcraftError(f"Labelled image data not found: {p}")
    if split is not None:
        if not (p / split).is_dir():
            present = sorted(d.name for d in p.iterdir() if d.is_dir())
            raise ClipcraftError(f"{p} has no {split!r} folder; its subfolders are {present[:10]}.")
        p = p / split
    else:
        subdirs = [d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if subdirs and all(d in SPLIT_FOLDERS for d in subdirs) and "test" in subdirs:
            p = p / "test"
    return read_class_folder(p, classnames_file, limit_per_class=limit_per_class)
