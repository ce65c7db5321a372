"""Opening images the same way everywhere: files or PIL images in, 8-bit RGB PIL images out."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipcraft.errors import ImageLoadError

ImageInput = Union[str, os.PathLike, Image.Image]  # noqa: UP007 (runtime alias, Python 3.10)

# Images larger than this many pixels are refused as decompression bombs (PIL's own default warns at ~89M).
MAX_IMAGE_PIXELS = 89_478_485

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit and 32-bit grayscale are rescaled to 0..255 (a plain ``convert`` would clip them to white);
    images with transparency are composited on white (a plain ``convert`` keeps whatever colour the
    transparent pixels happen to hold, often black); palette, CMYK, LAB and 1-bit images are converted.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        else:  # float images: assume 0..1 when they fit, else min-max
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
            arr = arr * 255.0 if hi <= 1.0 and lo >= 0.0 else (arr - lo) / max(hi - lo, 1e-12) * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(image: ImageInput) -> Image.Image:
    """Return ``image`` as an 8-bit RGB PIL image, with EXIF orientation applied.

    Accepts a path or an already opened PIL image. Raises :class:`ImageLoadError` naming the file when it
    is missing, not an image, truncated, or larger than :data:`MAX_IMAGE_PIXELS` (decompression bomb); the
    last three as :class:`BadImageError`, which says which of them it was.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if not isinstance(image, (str, os.PathLike)):
        raise ImageLoadError(f"Expected a file path or a PIL image, got {type(image).__name__}.")
    path = Path(image)
    if not path.is_file():
        raise ImageLoadError(f"Image file not found: {path}")
    return decode_image(path)


# -- the one way a file or encoded bytes are opened with PIL ------------------------------------------------

# Why an image could not be used (the data layer counts bad images by these kinds).
MISSING_FILE = "missing_file"  # the file does not exist
UNREADABLE_IMAGE = "unreadable_image"  # not an image, truncated, or fails to decode
TOO_LARGE = "too_large"  # over the pixel limit (decompression bomb guard)

_BOMB_ERRORS = (Image.DecompressionBombWarning, Image.DecompressionBombError)

ImageSource = Union[str, os.PathLike, bytes]  # noqa: UP007 (runtime alias, Python 3.10)


class BadImageError(ImageLoadError):
    """An image that cannot be used, with ``kind`` one of :data:`MISSING_FILE`, :data:`UNREADABLE_IMAGE` or
    :data:`TOO_LARGE`, ``where`` naming the source and ``reason`` saying what was wrong."""

    def __init__(self, kind: str, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.kind = kind
        self.where = where
        self.reason = reason


@contextlib.contextmanager
def _opened(source: Path | bytes, where: str, max_pixels: int | None, action: str) -> Iterator[Image.Image]:
    """Open ``source`` with PIL and refuse it from its header when it has more than ``max_pixels`` (default
    :data:`MAX_IMAGE_PIXELS`, read at call time so tests and users can change it), before anything is
    decoded. Every PIL failure inside the block becomes a :class:`BadImageError` with its kind."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
                width, height = opened.size
                if width * height > limit:
                    advice = (
                        "; resize it or raise clipcraft.images.MAX_IMAGE_PIXELS" if max_pixels is None else ""
                    )
                    raise BadImageError(
                        TOO_LARGE,
                        where,
                        f"{width}x{height} pixels is over the {limit:,} pixel limit (possible decompression bomb)"
                        + advice,
                    )
                yield opened
    except BadImageError:
        raise
    except _BOMB_ERRORS as exc:
        raise BadImageError(TOO_LARGE, where, f"Too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(UNREADABLE_IMAGE, where, "Not an image file (or an unsupported format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(UNREADABLE_IMAGE, where, f"Could not {action}: {exc}") from exc


def _source(source: ImageSource, where: str | None) -> tuple[Path | bytes, str]:
    """``source`` as a Path (checked to exist) or bytes, and the name to use for it in messages."""
    if isinstance(source, bytes):
        return source, "<image bytes>" if where is None else where
    path = Path(source)
    where = str(path) if where is None else where
    if not path.is_file():
        raise BadImageError(MISSING_FILE, where, "File not found")
    return path, where


def decode_image(
    source: ImageSource, where: str | None = None, *, max_pixels: int | None = None, draft: int | None = None
) -> Image.Image:
    """Decode a file path or encoded bytes into an 8-bit RGB PIL image (EXIF orientation applied).

    ``draft``: the caller will shrink the image to fit ``draft`` x ``draft``; formats that can decode at a
    reduced scale (JPEG: 1/2, 1/4, 1/8) then do so, never below that size (several times faster for
    thumbnails). Other formats decode in full.

    Raises :class:`BadImageError` with ``kind`` :data:`MISSING_FILE` (no such file), :data:`TOO_LARGE` (over
    ``max_pixels``, default :data:`MAX_IMAGE_PIXELS`, checked from the header before decoding) or
    :data:`UNREADABLE_IMAGE` (not an image, truncated, corrupt). ``where`` names the source in messages
    (default: the path, or ``<image bytes>``).
    """
    source, where = _source(source, where)
    with _opened(source, where, max_pixels, "decode") as opened:
        if draft is not None and opened.format == "JPEG":
            opened.draft("RGB", (draft, draft))
        opened.load()  # decode now so truncated data fails here, with the source's name
        return to_rgb(ImageOps.exif_transpose(opened))


def verify_image(source: ImageSource, where: str | None = None, *, max_pixels: int | None = None) -> None:
    """The fast check of :func:`decode_image`'s failures: the file exists, PIL recognises the format, the
    size is under the limit and ``Image.verify()`` passes (PNG checksums; JPEG data is not decoded, so a
    truncated JPEG passes). Raises :class:`BadImageError` as :func:`decode_image` does."""
    source, where = _source(source, where)
    with _opened(source, where, max_pixels, "read") as opened:
        opened.verify()
