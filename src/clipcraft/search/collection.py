"""The collection to index: image files under a folder (with sizes and modification times) and captions."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from clipcraft.errors import ClipcraftError
from clipcraft.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class FileEntry:
    """One image file: its path relative to the collection root (POSIX separators), size and mtime."""

    path: str
    size: int  # bytes
    mtime_ns: int  # modification time, nanoseconds since the epoch

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


def scan_images(root: str | os.PathLike[str]) -> list[FileEntry]:
    """Every image file under ``root``, recursively, sorted by relative path.

    Files are recognised by extension (:data:`clipcraft.images.IMAGE_EXTENSIONS`, any case); hidden files and
    folders (names starting with ``.``) are skipped, and symbolic links to folders are not followed.
    Raises :class:`ClipcraftError` when ``root`` is not a folder.
    """
    base = Path(root)
    if not base.is_dir():
        raise ClipcraftError(f"Image folder not found (or not a folder): {base}")
    entries: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            full = Path(dirpath) / name
            try:
                st = full.stat()
            except OSError:  # vanished between listing and stat
                continue
            entries.append(FileEntry(full.relative_to(base).as_posix(), int(st.st_size), int(st.st_mtime_ns)))
    entries.sort(key=lambda e: e.path)
    return entries


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
