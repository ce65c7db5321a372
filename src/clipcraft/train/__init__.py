"""Training: the loop (:func:`train`), its config, the runtime (device, processes, precision) and the run
helper shared with fine-tuning, optimizer and schedule, checkpoints, feature cache.

Importing this package is light: torch loads on first use of :func:`train` or :class:`TrainResult`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LoaderConfig", "OptimConfig", "RunConfig", "TrainConfig", "TrainResult", "train"]

if TYPE_CHECKING:
    from clipcraft.train.config import LoaderConfig, OptimConfig, RunConfig, TrainConfig
    from clipcraft.train.loop import TrainResult, train

_LAZY = {
    "LoaderConfig": "clipcraft.train.config",
    "OptimConfig": "clipcraft.train.config",
    "RunConfig": "clipcraft.train.config",
    "TrainConfig": "clipcraft.train.config",
    "TrainResult": "clipcraft.train.loop",
    "train": "clipcraft.train.loop",
}


def __getattr__(name: str) -> Any:
    import importlib

    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clipcraft.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
