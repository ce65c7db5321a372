"""Search over an image collection: embed a folder, index it (exact or FAISS), query it by text or image.

Importing this package is light (no torch, FAISS or web packages); they load when an index is built or
searched. The main entry point is :class:`clipcraft.search.index.Index`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["BuildReport", "CaptionResult", "Index", "IndexConfig", "SearchResult", "build_index"]

if TYPE_CHECKING:
    from clipcraft.search.index import (
        BuildReport,
        CaptionResult,
        Index,
        IndexConfig,
        SearchResult,
        build_index,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("clipcraft.search.index"), name)
    raise AttributeError(f"module 'clipcraft.search' has no attribute {name!r}")
