"""What the web API accepts. A request outside these limits gets a 4xx with a message."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_k: int = 100  # results per query
    max_query_chars: int = 500  # text query length
    max_upload_bytes: int = 8 * 1024 * 1024  # uploaded image file size
    max_upload_pixels: int = 40_000_000  # decoded image size (decompression bombs)
    max_labels: int = 32  # zero-shot labels per request
    max_label_chars: int = 100  # characters per zero-shot label
    upload_types: tuple[str, ...] = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")
