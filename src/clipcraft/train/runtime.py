"""Where a job runs, decided once at its edge: the device, the processes (torchrun's process group: gloo on
CPU, NCCL on GPU) and the concrete precision. Everything below takes the :class:`Runtime` and never sees
``auto``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from clipcraft.errors import ClipcraftError
from clipcraft.precision import Precision, autocast, resolve_precision


@dataclass(frozen=True)
class Runtime:
    """The device, this process's place among the job's processes, and the precision that runs."""

    device: torch.device
    precision: Precision  # concrete: fp32 or bf16
    precision_requested: str  # the user's word (auto | fp32 | bf16), kept for the record
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on this device when the precision is bf16; a no-op for fp32."""
        return autocast(self.device, self.precision)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over all ranks (every rank must call this)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._reduce_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks (every rank must call this)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._reduce_device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient of ``params`` by its mean over all ranks (every rank must call this): for
        trained parameters outside the DDP-wrapped model, such as a loss's own head."""
        if not self.distributed:
            return
        for param in params:
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad)
                param.grad /= self.world_size

    def record(self) -> dict[str, str]:
        """What a run writes down about where it ran (summary, checkpoint)."""
        return {
            "device": str(self.device),
            "precision": self.precision.value,
            "precision_requested": self.precision_requested,
        }

    @property
    def _reduce_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else cpu; other names as torch reads them.
    Raises :class:`ClipcraftError` for a CUDA device on a machine without CUDA."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClipcraftError(f"device={name!r} but CUDA is not available here; use device=cpu.")
    return device


def single_process_runtime(device: str, precision: str | Precision) -> Runtime:
    """The runtime of a one-process job (fine-tuning): ``device`` and ``precision`` resolved, nothing to
    join or tear down, whatever torchrun's environment says."""
    resolved = resolve_device(device)
    return Runtime(resolved, resolve_precision(precision, resolved), str(precision))


@contextlib.contextmanager
def open_runtime(device: str, precision: str | Precision) -> Iterator[Runtime]:
    """Resolve the device and precision once and, under torchrun (``WORLD_SIZE`` > 1), join the process
    group for the duration of the ``with`` block."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    runtime = Runtime(
        device=resolved,
        precision=resolve_precision(precision, resolved),
        precision_requested=str(precision),
        rank=rank,
        world_size=world,
        local_rank=local_rank,
    )
    joined = False
    if world > 1 and not torch.distributed.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
        joined = True
    try:
        yield runtime
    finally:
        if joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
