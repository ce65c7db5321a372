"""Thumbnails of indexed images for the search page: resized, EXIF-rotated, cached on disk.

A thumbnail is made once per (file path, size, modification time, thumbnail size) and kept as a JPEG in the
cache folder (by default ``.<index name>.thumbs/`` beside the index, so a rebuild of the index keeps it). The
original is opened with :func:`clipcraft.server.files.open_indexed`, so a thumbnail is only ever made from a
file that is still the indexed one.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from clipcraft.files import atomic_file
from clipcraft.images import decode_image
from clipcraft.search.index import Index
from clipcraft.server.files import open_indexed

THUMB_FORMAT_VERSION = 1  # part of the key: bump when the way thumbnails are made changes
JPEG_QUALITY = 82


def default_cache_dir(index_dir: str | os.PathLike[str]) -> Path:
    """``.<index name>.thumbs/`` beside the index directory."""
    p = Path(index_dir).resolve()
    return p.parent / f".{p.name}.thumbs"


class ThumbnailCache:
    """Thumbnails of ``index``'s images in ``folder``: :meth:`get` returns the JPEG file of one."""

    def __init__(self, index: Index, folder: str | os.PathLike[str], max_pixels: int | None = None) -> None:
        self.index = index
        self.folder = Path(folder)
        self.max_pixels = max_pixels

    def key(self, row: int, size: int) -> str:
        e = self.index.files[row]
        raw = f"{THUMB_FORMAT_VERSION}|{e.path}|{e.size}|{e.mtime_ns}|{size}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def get(self, row: int, size: int) -> Path:
        """The thumbnail of ``row`` whose longest side is at most ``size`` pixels (never upscaled), made now
        if not cached. The original is checked first (:func:`open_indexed`; raises its ``Refused``) even when
        the thumbnail is cached, so a changed or swapped file stops being shown at once. Raises
        :class:`~clipcraft.images.BadImageError` when the original cannot be decoded."""
        original = open_indexed(self.index, row)
        key = self.key(row, size)
        target = self.folder / key[:2] / f"{key}.jpg"
        if target.is_file():
            original.file.close()
            return target
        data = original.read()
        image = decode_image(data, self.index.files[row].path, max_pixels=self.max_pixels, draft=size)
        image.thumbnail((size, size), resample=3)  # 3: bicubic; thumbnail() keeps the aspect ratio
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as fh:
            fh.write(buf.getvalue())
        return target
