"""Opening images the same way everywhere: files or PIL images in, 8-bit RGB PIL images out."""

from __future__ import annotations

import os
import warnings
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
    is missing, not an image, truncated, or larger than :data:`MAX_IMAGE_PIXELS` (decompression bomb).
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if not isinstance(image, (str, os.PathLike)):
        raise ImageLoadError(f"Expected a file path or a PIL image, got {type(image).__name__}.")
    path = Path(image)
    if not path.is_file():
        raise ImageLoadError(f"Image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageLoadError(
                        f"Image {path} is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} pixel limit "
                        "(possible decompression bomb); resize it or raise clipcraft.images.MAX_IMAGE_PIXELS."
                    )
                opened.load()  # decode now so truncated files fail here, with the file name
                out = ImageOps.exif_transpose(opened)
                return to_rgb(out)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"Image {path} is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"Not an image file (or an unsupported format): {path}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"Could not decode image {path}: {exc}") from exc
