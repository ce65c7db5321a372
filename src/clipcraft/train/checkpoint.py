"""Resumable training state, written atomically: a kill at any moment leaves the previous file loadable."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`clipcraft.files.atomic_file`: a temporary file beside ``path``, fsynced,
    then renamed over it."""
    from clipcraft.files import atomic_file

    with atomic_file(path) as fh:
        torch.save(obj, fh)


def load_checkpoint(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    from clipcraft.errors import CheckpointError

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"No {CHECKPOINT_FILE} in {run_dir}: nothing to resume.")
    return torch.load(path, map_location="cpu", weights_only=False)
