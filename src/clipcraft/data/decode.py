"""Decoding and checking images for the data layer, with each failure classified by kind.

Paths go through :func:`clipcraft.images.load_image` (same RGB conversion and EXIF handling as everywhere);
bytes from tar members get the same treatment here. The pixel limit is read from
``clipcraft.images.MAX_IMAGE_PIXELS`` at call time, so raising (or, in tests, lowering) it takes effect.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from clipcraft import images
from clipcraft.data.report import MISSING_FILE, TOO_LARGE, UNREADABLE_IMAGE
from clipcraft.errors import ImageLoadError

ImageSource = str | os.PathLike | bytes
CheckMode = Literal["none", "header", "decode"]
CHECK_MODES = ("none", "header", "decode")

_BOMB_ERRORS = (Image.DecompressionBombWarning, Image.DecompressionBombError)


class BadImageError(ImageLoadError):
    """An image that cannot be used, with ``kind`` one of missing_file, unreadable_image or too_large."""

    def __init__(self, kind: str, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.kind = kind
        self.where = where
        self.reason = reason


def _describe(source: ImageSource, where: str | None) -> str:
    if where is not None:
        return where
    return "<image bytes>" if isinstance(source, bytes) else str(source)


def _check_size(opened: Image.Image, where: str) -> None:
    width, height = opened.size
    limit = images.MAX_IMAGE_PIXELS
    if width * height > limit:
        raise BadImageError(
            TOO_LARGE,
            where,
            f"{width}x{height} pixels is over the {limit:,} pixel limit (possible decompression bomb)",
        )


def decode_image(source: ImageSource, where: str | None = None) -> Image.Image:
    """Decode a file path or encoded bytes into an 8-bit RGB PIL image (EXIF orientation applied).

    Raises :class:`BadImageError` with ``kind`` ``missing_file`` (no such file), ``too_large`` (over the pixel
    limit, checked from the header before decoding) or ``unreadable_image`` (not an image, truncated, corrupt).
    ``where`` names the source in messages (default: the path, or ``<image bytes>``).
    """
    where = _describe(source, where)
    if isinstance(source, bytes):
        return _decode_bytes(source, where)
    path = Path(source)
    if not path.is_file():
        raise BadImageError(MISSING_FILE, where, "file not found")
    _open_header(path, where, verify=False)  # cheap size check first, so a bomb is never decoded
    try:
        return images.load_image(path)
    except ImageLoadError as exc:
        kind = TOO_LARGE if isinstance(exc.__cause__, _BOMB_ERRORS) else UNREADABLE_IMAGE
        raise BadImageError(kind, where, str(exc.__cause__ or exc)) from exc


def _decode_bytes(data: bytes, where: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                _check_size(opened, where)
                opened.load()  # decode now so truncated data fails here
                return images.to_rgb(ImageOps.exif_transpose(opened))
    except BadImageError:
        raise
    except _BOMB_ERRORS as exc:
        raise BadImageError(TOO_LARGE, where, f"too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(UNREADABLE_IMAGE, where, "not an image (or an unsupported format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(UNREADABLE_IMAGE, where, f"could not decode: {exc}") from exc


def _open_header(source: Path | bytes, where: str, verify: bool) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
                _check_size(opened, where)
                if verify:
                    opened.verify()
    except BadImageError:
        raise
    except _BOMB_ERRORS as exc:
        raise BadImageError(TOO_LARGE, where, f"too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(UNREADABLE_IMAGE, where, "not an image (or an unsupported format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(UNREADABLE_IMAGE, where, f"could not read: {exc}") from exc


def check_image(source: ImageSource, mode: CheckMode = "header", where: str | None = None) -> None:
    """Check that ``source`` is a usable image, raising :class:`BadImageError` (with its kind) when not.

    ``mode="header"`` is fast: the file exists, PIL recognises the format, the size is under the pixel limit,
    and ``Image.verify()`` passes (which checks PNG chunk checksums but does not decode JPEG data, so a
    truncated JPEG passes). ``mode="decode"`` decodes every pixel and catches truncation too.
    ``mode="none"`` only checks that a path exists.
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"check mode must be one of {CHECK_MODES}, got {mode!r}")
    where = _describe(source, where)
    if mode == "decode":
        decode_image(source, where)
        return
    if not isinstance(source, bytes):
        source = Path(source)
        if not source.is_file():
            raise BadImageError(MISSING_FILE, where, "file not found")
    if mode == "header":
        _open_header(source, where, verify=True)
