"""AdamW with one parameter group per part of the model, and the warmup + cosine schedule. Both jobs use
them: they take the parameter groups and the shared :class:`~clipcraft.train.config.OptimConfig`."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from clipcraft.errors import ClipcraftError
from clipcraft.train.config import OptimConfig


def param_groups(model: nn.Module, rates: Mapping[str, float], weight_decay: float) -> list[dict]:
    """Trainable parameters grouped by part (``image_tower``, ``text_tower``, ``heads``, ``logit`` for the
    logit scale/bias; anything else counts as ``heads``), each part split into matrices decayed by
    ``weight_decay`` and non-decayed 1-D parameters (norms, biases, scalars).

    Each group carries a ``name`` and its learning rate from ``rates`` (part -> lr); frozen parameters are
    left out. Raises :class:`ClipcraftError` when a part with trainable parameters has no rate.
    """
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("image_tower."):
            part = "image_tower"
        elif name.startswith("text_tower."):
            part = "text_tower"
        elif name.startswith("logit_"):
            part = "logit"
        else:
            part = "heads"
        decay = param.ndim >= 2 and part != "logit"
        buckets.setdefault((part, decay), []).append(param)
    missing = sorted({part for part, _ in buckets} - set(rates))
    if missing:
        raise ClipcraftError(f"No learning rate for the trainable part(s) {missing}; rates: {dict(rates)}.")
    return [
        {
            "name": f"{part}{'' if decay else '_no_decay'}",
            "params": params,
            "lr": rates[part],
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (part, decay), params in sorted(buckets.items())
    ]


def loss_groups(loss: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Groups for a loss's own trainable parameters (SLIP's SimCLR head), named ``ssl_head`` and
    ``ssl_head_no_decay``, split and decayed as :func:`param_groups` splits a model's heads; none for a loss
    without parameters."""
    groups = param_groups(loss, {"heads": lr}, weight_decay)
    for group in groups:
        group["name"] = group["name"].replace("heads", "ssl_head")
    return groups


def build_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (from :func:`param_groups`) with the betas and eps of ``optim``."""
    return torch.optim.AdamW(groups, betas=tuple(optim.betas), eps=optim.eps)  # type: ignore[arg-type]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of each group's base rate at ``step``: linear warmup from 0, then cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup for ``optim.warmup_steps`` (at most ``total_steps - 1``), then cosine to ``min_lr_ratio``."""
    warmup = min(optim.warmup_steps, max(0, total_steps - 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, optim.min_lr_ratio)
    )
