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
