"""Which process this is in a distributed run, and gathering tensors from every rank with gradient.

Core helpers with no set-up of their own: the process group is created at the edge of a job (see
``clipcraft.train.runtime``); outside one, this process is rank 0 of a world of 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the values given, and for each one left None the process group's (0 and 1
    when torch.distributed is not initialized, as in a single-process run)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if ready else 0
    if world_size is None:
        world_size = dist.get_world_size() if ready else 1
    return rank, world_size


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather (B, D) from every rank into (N*B, D), in rank order, keeping the autograd graph: the
    gradient reaching each rank's slice is the sum of the gradients all ranks computed for it. Every rank
    must call this with the same shape; needs an initialised process group."""
    import torch
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)
