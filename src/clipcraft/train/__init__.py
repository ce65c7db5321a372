"""Training: the loop (:func:`train`), its optimizer and schedule, checkpoints, feature cache and DDP set-up."""

from __future__ import annotations

from clipcraft.config import TrainConfig
from clipcraft.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
