"""The run helper both loops share: one run directory with its seeding, resume, atomic checkpoints, metrics
log, ``max_steps`` and progress bars. The loops keep the order of events; this keeps the bookkeeping."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipcraft.train.checkpoint import CHECKPOINT_FILE, atomic_torch_save, rng_state, set_rng_state
from clipcraft.train.config import RunConfig
from clipcraft.train.runlog import RunLog
from clipcraft.train.runtime import Runtime


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """A run in ``run_dir`` under ``runtime``: ``state`` (``step``, ``epoch``, ``batch`` and the job's own
    entries) is what a checkpoint saves and a resume restores.

    ``config`` is the job config as a flat mapping; it is recorded with the precision that runs in place of
    the request (``auto`` -> ``bf16`` or ``fp32``), in ``config.yaml`` and in every checkpoint, so a resumed
    run keeps the precision it started with. With ``checkpoint`` (the loaded checkpoint of the run being resumed) the
    metrics logged after its step are dropped, since the resumed run logs them again.
    """

    def __init__(
        self,
        run_dir: Path,
        runtime: Runtime,
        settings: RunConfig,
        config: Mapping[str, Any],
        state: dict[str, Any],
        checkpoint: dict[str, Any] | None = None,
    ) -> None:
        self.dir = run_dir
        self.runtime = runtime
        self.settings = settings
        self.config = {**config, "precision": runtime.precision.value}
        self.state = {"step": 0, "epoch": 0, "batch": 0, **state}
        self.checkpoint = checkpoint
        self.log = RunLog(run_dir, runtime.is_main, checkpoint["state"]["step"] if checkpoint else None)
        self.log.write_config(self.config, header=_precision_note(runtime))  # rank 0 only, as all the log
        self._tick, self._samples = time.perf_counter(), 0

    def restore(self) -> None:
        """After the job has loaded its own objects from :attr:`checkpoint`: take back the step counters and
        the job's state entries, and the random generators (last, so nothing built before draws from them)."""
        assert self.checkpoint is not None
        self.state.update(self.checkpoint["state"])
        set_rng_state(self.checkpoint["rng"])
        self.log.info(
            f"Resumed {self.dir} at step {self.state['step']} (epoch {self.state['epoch']}, "
            f"batch {self.state['batch']})."
        )

    def save_checkpoint(self, **objects: Any) -> None:
        """Write ``objects`` (model, optimizer, scheduler state dicts, ...) with the state, the random
        generators, the recorded config and the precision, atomically (rank 0; the others wait)."""
        if self.runtime.is_main:
            payload = {
                **objects,
                "state": dict(self.state),
                "rng": rng_state(),
                "config": self.config,
                **self.runtime.record(),
            }
            atomic_torch_save(payload, self.dir / CHECKPOINT_FILE)
        self.runtime.barrier()

    def progress(self, total: int, epochs: int) -> Any:
        """A progress bar over this epoch's ``total`` steps, starting at the batches already consumed; also
        starts a new throughput window."""
        epoch = self.state["epoch"]
        self._tick, self._samples = time.perf_counter(), 0
        return self.log.progress(total=total, initial=self.state["batch"], desc=f"epoch {epoch + 1}/{epochs}")

    def step_done(self, samples: int) -> None:
        """Count one optimizer step over ``samples`` samples (all processes)."""
        self.state["step"] += 1
        self._samples += samples

    def log_due(self) -> bool:
        step = self.state["step"]
        return step % self.settings.log_every == 0 or step == 1

    def samples_per_s(self) -> float:
        """Throughput since the last call (or the start), and start a new window."""
        now = time.perf_counter()
        rate = self._samples / max(now - self._tick, 1e-9)
        self._tick, self._samples = now, 0
        return rate

    def out_of_steps(self) -> bool:
        """Whether ``max_steps`` optimizer steps are done."""
        return self.settings.max_steps is not None and self.state["step"] >= self.settings.max_steps

    def checkpoint_due(self) -> bool:
        every = self.settings.checkpoint_every
        return bool(every) and self.state["step"] % every == 0

    def end_epoch(self) -> None:
        self.state["epoch"] += 1
        self.state["batch"] = 0

    def stop_at_max_steps(self, **objects: Any) -> None:
        """Checkpoint in the middle of an epoch and say how to go on."""
        self.save_checkpoint(**objects)
        self.log.info(
            f"Stopped at max_steps={self.settings.max_steps}; continue with --resume {self.dir} max_steps=null"
        )


def _precision_note(runtime: Runtime) -> str:
    return f"precision: {runtime.precision_requested} requested, {runtime.precision.value} ran on {runtime.device}"
