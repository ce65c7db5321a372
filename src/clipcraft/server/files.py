"""Opening an indexed image for the web server, safely: by row number only, and only while the file on disk
is still the one the index recorded.

A file is served when (1) its path, with every link resolved, lies inside the indexed folder, (2) it is a
regular file (not a folder, device or pipe; the last path component is opened without following links, so
a link swapped in after the check is refused too) and (3) its size and modification time match the index
record. Anything else is a :class:`Refused` with the HTTP status and a message that says what to do.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import BinaryIO

from clipcraft.search.index import Index

# Leading bytes -> content type, for the formats clipcraft indexes (IMAGE_EXTENSIONS). The type served
# is what the bytes are, not what the file name says.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


class Refused(Exception):
    """The indexed file cannot be served: ``status`` (404, 403 or 410) and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class IndexedFile:
    """An open indexed file, checked: ``file`` (read it, then close it), its ``size``, ``mtime_ns``,
    ``content_type`` (from its leading bytes) and ``path`` (resolved)."""

    file: BinaryIO
    path: str
    size: int
    mtime_ns: int
    content_type: str

    def read(self) -> bytes:
        """The whole file; closes it."""
        with self.file:
            return self.file.read()


def sniff_content_type(head: bytes) -> str:
    """The image content type of a file starting with ``head`` (16 bytes are enough), or
    ``application/octet-stream`` when the bytes are none of the known image formats."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for magic, ctype in _SIGNATURES:
        if head.startswith(magic):
            return ctype
    return "application/octet-stream"


def open_indexed(index: Index, row: int) -> IndexedFile:
    """Open the file of ``row`` after the three checks in the module docstring; raises :class:`Refused`.

    ``row`` must be a valid row (the caller checks the range)."""
    entry = index.files[row]
    root = os.path.realpath(index.root)
    path = os.path.realpath(os.path.join(root, entry.path))
    rebuild = "rebuild the index (`clipcraft index build`) to pick up the change"
    if os.path.commonpath([root, path]) != root:
        raise Refused(403, f"Image {row} ({entry.path}) now points outside the indexed folder; {rebuild}.")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a pipe must not block
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise Refused(404, f"Image {row} ({entry.path}) is no longer on disk; {rebuild}.") from None
    except OSError:  # a link swapped in after the check (ELOOP), a folder, no permission
        raise Refused(
            403, f"Image {row} ({entry.path}) is not a readable file any more; {rebuild}."
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(403, f"Image {row} ({entry.path}) is no longer a regular file; {rebuild}.")
        if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
            raise Refused(410, f"Image {row} ({entry.path}) has changed since indexing; {rebuild}.")
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    head = file.read(16)
    file.seek(0)
    return IndexedFile(file, path, st.st_size, st.st_mtime_ns, sniff_content_type(head))
