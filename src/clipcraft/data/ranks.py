"""Which process this is in a distributed run: the rank and world size the data layer splits its data by."""

from __future__ import annotations


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
