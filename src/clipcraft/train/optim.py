"""AdamW with one parameter group per part of the model, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from clipcraft.config import TrainConfig


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Trainable parameters grouped by part (image tower, text tower, heads, logit scale/bias), each part
    split into weight-decayed matrices and non-decayed 1-D parameters (norms, biases, scalars).

    Each group carries a ``name`` and its own ``lr``; frozen parameters are left out.
    """
    rates = {
        "image_tower": config.lr_image_tower,
        "text_tower": config.lr_text_tower,
        "heads": config.lr_heads,
        "logit": config.lr_heads,
    }
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
    return [
        {
            "name": f"{part}{'' if decay else '_no_decay'}",
            "params": params,
            "lr": rates[part],
            "weight_decay": config.weight_decay if decay else 0.0,
        }
        for (part, decay), params in sorted(buckets.items())
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, config), betas=tuple(config.betas), eps=config.eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of each group's base rate at ``step``: linear warmup from 0, then cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = min(config.warmup_steps, max(0, total_steps - 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, config.min_lr_ratio)
    )
