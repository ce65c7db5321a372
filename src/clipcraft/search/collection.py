"""Captions for an index's image->text search (the image files are listed by :mod:`clipcraft.data.folder`)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from clipcraft.errors import ClipcraftError


def read_captions(path: str | os.PathLike[str]) -> list[str]:
    """Captions for image→text search, de-duplicated in file order.

    A ``.csv`` file is read as CSV: the ``caption`` column when the header has one (e.g. Flickr8k's
    ``image,caption``), else the first column of every row. Any other file is plain text, one caption per
    line. Blank captions are skipped. Raises :class:`ClipcraftError` for a missing or unreadable file or one
    with no captions.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ClipcraftError(f"Caption file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClipcraftError(f"Could not read caption file {p}: {exc}. It must be UTF-8 text.") from exc
    if p.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
        column = 0
        if rows and "caption" in [c.strip().lower() for c in rows[0]]:
            column = [c.strip().lower() for c in rows[0]].index("caption")
            rows = rows[1:]
        raw = [row[column] if len(row) > column else "" for row in rows]
    else:
        raw = text.splitlines()
    captions = list(dict.fromkeys(c.strip() for c in raw if c.strip()))
    if not captions:
        raise ClipcraftError(f"Caption file {p} holds no captions.")
    return captions


IMAGE_COLUMNS = ("image", "file", "filename", "path")  # a caption CSV's column naming each caption's image


def read_image_captions(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Each image's own captions from a caption CSV with an image column (``image``, ``file``, ``filename``
    or ``path``) and a ``caption`` column, e.g. Flickr8k's ``captions.txt`` saved as ``.csv``: image name as
    written in the file -> its captions in file order, duplicates and blanks dropped. Any other file (plain
    text, a CSV without those columns) names no images: ``{}``. Errors as :func:`read_captions`."""
    p = Path(path)
    if p.suffix.lower() != ".csv":
        return {}
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClipcraftError(f"Could not read caption file {p}: {exc}. It must be UTF-8 text.") from exc
    rows = list(csv.reader(text.splitlines()))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    image_column = next((header.index(c) for c in IMAGE_COLUMNS if c in header), None)
    if image_column is None or "caption" not in header:
        return {}
    caption_column = header.index("caption")
    found: dict[str, dict[str, None]] = {}
    for row in rows[1:]:
        if len(row) > max(image_column, caption_column):
            name, caption = row[image_column].strip(), row[caption_column].strip()
            if name and caption:
                found.setdefault(name, {})[caption] = None
    return {name: list(captions) for name, captions in found.items()}


def match_image_captions(named: dict[str, list[str]], paths: list[str]) -> dict[str, list[str]]:
    """The captions of each indexed file: ``named`` (from :func:`read_image_captions`) matched to the index's
    relative ``paths`` by the full relative path, else by file name when that name is unique in the index.
    Returns relative path -> captions, for the files that have some."""
    if not named:
        return {}
    by_name: dict[str, list[str]] = {}
    for rel in paths:
        by_name.setdefault(Path(rel).name, []).append(rel)
    out: dict[str, list[str]] = {}
    for name, captions in named.items():
        key = name.replace("\\", "/").removeprefix("./")
        if key in by_name.get(Path(key).name, []):
            out[key] = captions
        elif len(by_name.get(Path(key).name, [])) == 1:
            out[by_name[Path(key).name][0]] = captions
    return out
