"""Image files under a folder, with sizes and modification times: what an index or the encoder reads from a
folder."""

from __future__ import annotations

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


@dataclass
class FolderScan:
    """What :func:`scan_folder` found: the image files, and the hidden files and folders it skipped
    (relative POSIX paths, sorted; a hidden folder is listed once, not file by file)."""

    entries: list[FileEntry]
    hidden: list[str]


def scan_folder(root: str | os.PathLike[str]) -> FolderScan:
    """Every image file under ``root``, recursively, sorted by relative path, and the hidden names skipped.

    Files are recognised by extension (:data:`clipcraft.images.IMAGE_EXTENSIONS`, any case); hidden files and
    folders (names starting with ``.``) are skipped and listed, and symbolic links to folders are not
    followed. Raises :class:`ClipcraftError` when ``root`` is not a folder.
    """
    base = Path(root)
    if not base.is_dir():
        raise ClipcraftError(f"Image folder not found (or not a folder): {base}")
    entries: list[FileEntry] = []
    hidden: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        hidden += [(here / d).relative_to(base).as_posix() for d in dirnames if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            full = here / name
            if name.startswith("."):
                hidden.append(full.relative_to(base).as_posix())
                continue
            try:
                st = full.stat()
            except OSError:  # vanished between listing and stat
                continue
            entries.append(FileEntry(full.relative_to(base).as_posix(), int(st.st_size), int(st.st_mtime_ns)))
    entries.sort(key=lambda e: e.path)
    return FolderScan(entries, sorted(hidden))


def scan_images(root: str | os.PathLike[str]) -> list[FileEntry]:
    """The image files of :func:`scan_folder` (hidden ones skipped)."""
    return scan_folder(root).entries
