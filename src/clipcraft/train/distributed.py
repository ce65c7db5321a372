"""Process-group set-up for torchrun, done once at the edge of the loop (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from clipcraft.errors import ClipcraftError


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over all ranks (every rank must call this)."""
        if not self.enabled:
            return value
        t = torch.tensor(
            [value], dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu"
        )
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor(
            [value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu"
        )
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClipcraftError(f"device={name!r} but CUDA is not available here; use device=cpu.")
    return device


def setup(device_name: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment, or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
