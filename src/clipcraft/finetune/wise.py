"""Weight-space ensembling (WiSE-FT): mix zero-shot and fine-tuned weights, keep the mix that validates best.

``theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned`` over the weights fine-tuning
changes (image tower, image projection head, classifier head; the zero-shot classifier head is its
initialisation from the class-name text embeddings). Plain fine-tuning tends to lose the robustness the
zero-shot model had; an intermediate alpha often keeps most of both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from clipcraft.errors import CheckpointError
from clipcraft.finetune.config import check_alphas


def interpolate_weights(
    zeroshot: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """``(1 - alpha) * zeroshot + alpha * finetuned`` for every floating-point tensor, in its own dtype.

    Computed as written (not as a lerp), so alpha = 0 returns the zero-shot values and alpha = 1 the
    fine-tuned values bit for bit. Non-float tensors (counters, index buffers) must be equal in both and are
    copied. Raises :class:`~clipcraft.errors.ClipcraftError` for an alpha outside [0, 1] and
    :class:`CheckpointError` for mismatched keys, shapes or integer buffers.
    """
    (alpha,) = check_alphas([alpha])
    if set(zeroshot) != set(finetuned):
        diff = sorted(set(zeroshot) ^ set(finetuned))
        raise CheckpointError(f"Zero-shot and fine-tuned weights have different keys, e.g. {diff[:5]}.")
    out: dict[str, Tensor] = {}
    for key, zs in zeroshot.items():
        ft = finetuned[key]
        if zs.shape != ft.shape:
            raise CheckpointError(f"{key}: zero-shot {tuple(zs.shape)} vs fine-tuned {tuple(ft.shape)}.")
        if zs.is_floating_point():
            out[key] = (1.0 - alpha) * zs + alpha * ft.to(zs.device, zs.dtype)
        elif torch.equal(zs, ft.to(zs.device)):
            out[key] = zs.clone()
        else:
            raise CheckpointError(f"{key} is a non-float tensor that differs between the two models.")
    return out


def sweep_alphas(
    zeroshot: Mapping[str, Tensor],
    finetuned: Mapping[str, Tensor],
    alphas: Sequence[float],
    load: Callable[[Mapping[str, Tensor]], None],
    evaluate: Callable[[], dict[str, Any]],
    known: Mapping[float, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every mixing coefficient: ``load`` the mixed weights into the model, then ``evaluate()``.

    ``known`` maps alphas already measured (typically 0: the zero-shot validation at step 0, and 1: the
    fine-tuned model's best epoch) to their metrics, which are reused instead of evaluated again; the
    mixtures at 0 and 1 are those exact weights, so the numbers are the same. Returns one row per alpha,
    ascending: ``{"alpha": a, **metrics}``. The model is left holding the last alpha's weights.
    """
    rows = []
    for alpha in check_alphas(alphas):
        if known is not None and alpha in known:
            metrics = dict(known[alpha])
        else:
            load(interpolate_weights(zeroshot, finetuned, alpha))
            metrics = evaluate()
        rows.append({"alpha": alpha, **metrics})
    return rows


def best_alpha(rows: Sequence[Mapping[str, Any]]) -> float:
    """The alpha with the highest ``top1``; among equal accuracies the lowest ``loss`` (small validation
    sets tie often, and the loss still tells the mixtures apart), then the smaller alpha (closer to the
    zero-shot model, whose robustness fine-tuning tends to lose)."""
    best = max(rows, key=lambda r: (r["top1"], -r.get("loss", 0.0), -r["alpha"]))
    return float(best["alpha"])
