"""clipcraft: train, evaluate and use CLIP models built from pretrained image and text towers.

The public API is importable without the heavy dependencies: torch, timm and transformers load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipcraft.version import __version__

__all__ = [
    "ClipModel",
    "ClipOutput",
    "Index",
    "ModelConfig",
    "TrainConfig",
    "ZeroShotClassifier",
    "create_model",
    "list_presets",
    "load",
    "losses",
    "__version__",
]

if TYPE_CHECKING:
    from clipcraft.config import ModelConfig
    from clipcraft.evaluation.zeroshot import ZeroShotClassifier
    from clipcraft.model import ClipModel, ClipOutput, create_model, load
    from clipcraft.presets import list_presets
    from clipcraft.search.index import Index
    from clipcraft.train.config import TrainConfig

_LAZY = {
    "ClipModel": "clipcraft.model",
    "ClipOutput": "clipcraft.model",
    "create_model": "clipcraft.model",
    "load": "clipcraft.model",
    "ModelConfig": "clipcraft.config",
    "TrainConfig": "clipcraft.train.config",
    "Index": "clipcraft.search.index",
    "ZeroShotClassifier": "clipcraft.evaluation.zeroshot",
    "list_presets": "clipcraft.presets",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "losses":
        return importlib.import_module("clipcraft.losses")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clipcraft' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
