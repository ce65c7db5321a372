"""Decoding and checking images for the data layer, with each failure classified by kind.

The decoding itself is :func:`clipcraft.images.decode_image` (the one PIL ladder: pixel limit from the header,
decompression-bomb guard, EXIF orientation, RGB), re-exported here with :class:`BadImageError`. The pixel limit
is read from ``clipcraft.images.MAX_IMAGE_PIXELS`` at call time, so raising (or, in tests, lowering) it takes
effect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from clipcraft.images import MISSING_FILE, BadImageError, ImageSource, decode_image, verify_image

__all__ = ["CHECK_MODES", "BadImageError", "CheckMode", "ImageSource", "check_image", "decode_image"]

CheckMode = Literal["none", "header", "decode"]
CHECK_MODES = ("none", "header", "decode")


def check_image(source: ImageSource, mode: CheckMode = "header", where: str | None = None) -> None:
    """Check that ``source`` is a usable image, raising :class:`BadImageError` (with its kind) when not.

    ``mode="header"`` is fast: the file exists, PIL recognises the format, the size is under the pixel limit,
    and ``Image.verify()`` passes (which checks PNG chunk checksums but does not decode JPEG data, so a
    truncated JPEG passes). ``mode="decode"`` decodes every pixel and catches truncation too.
    ``mode="none"`` only checks that a path exists.
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"check mode must be one of {CHECK_MODES}, got {mode!r}")
    if mode == "decode":
        decode_image(source, where)
    elif mode == "header":
        verify_image(source, where)
    elif not isinstance(source, bytes) and not Path(source).is_file():
        raise BadImageError(MISSING_FILE, str(source) if where is None else where, "File not found")
