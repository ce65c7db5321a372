"""Contrastive losses over normalised embeddings, separate from the model.

Both losses take image and text embeddings (B, D), L2-normalised, where row i of each is a matching pair,
and the model's (already exponentiated) logit scale. With ``distributed=True`` inside an initialised
``torch.distributed`` process group, embeddings from all ranks are gathered *with gradient*; every rank must
pass the same batch size B.

Distributed contract: each rank returns the loss over its own B rows against all N*B columns. The mean of
the N returned losses equals the single-process loss on the global batch of N*B pairs, and the gradients
reaching each rank's embeddings are N times the single-process gradients, so after DDP averages gradients
across ranks every parameter receives exactly the single-process gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipcraft.data.ranks import rank_and_world_size

if TYPE_CHECKING:
    from clipcraft.model import ClipOutput

LOSS_NAMES = ("clip", "siglip")


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather (B, D) from every rank into (N*B, D), in rank order, keeping the autograd graph."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _columns(image_emb: Tensor, text_emb: Tensor, distributed: bool) -> tuple[Tensor, Tensor, int]:
    """The column sets (all images, all texts) and this rank's row offset into them."""
    rank, world = rank_and_world_size() if distributed else (0, 1)
    if world == 1:
        return image_emb, text_emb, 0
    return gather_with_grad(image_emb), gather_with_grad(text_emb), rank * image_emb.shape[0]


def clip_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, *, distributed: bool = False
) -> Tensor:
    """Symmetric cross-entropy (CLIP / InfoNCE) over scaled cosine similarities.

    Args:
        image_emb: (B, D) normalised image embeddings.
        text_emb: (B, D) normalised text embeddings; row i matches image row i.
        logit_scale: scalar multiplier (exp of the learnable log scale).
        distributed: gather columns from all ranks (see the module docstring).

    Returns: scalar loss, mean of the image->text and text->image cross-entropies, computed in float32.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    all_images, all_texts, offset = _columns(image_emb, text_emb, distributed)
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset  # (B,)
    logits_per_image = logit_scale * image_emb @ all_texts.T  # (B, N*B)
    logits_per_text = logit_scale * text_emb @ all_images.T  # (B, N*B)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    distributed: bool = False,
) -> Tensor:
    """Pairwise sigmoid loss (SigLIP): every image-text pair is a binary match / no-match decision.

    ``loss = -1/B * sum_ij log sigmoid(z_ij * (scale * <img_i, txt_j> + bias))`` with z_ij = +1 for matching
    pairs and -1 otherwise: summed over pairs, averaged over the batch's images, as in the SigLIP paper.
    Shapes as for :func:`clip_loss`; ``logit_bias`` is a scalar added to every logit.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    _, all_texts, offset = _columns(image_emb, text_emb, distributed)
    batch = image_emb.shape[0]
    logits = logit_scale * image_emb @ all_texts.T + logit_bias  # (B, N*B)
    signs = -torch.ones_like(logits)
    rows = torch.arange(batch, device=logits.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / batch


class ClipLoss(nn.Module):
    """:func:`clip_loss` on a model output."""

    def __init__(self, distributed: bool = False) -> None:
        super().__init__()
        self.distributed = distributed

    def forward(self, output: ClipOutput) -> Tensor:
        assert output.image_embeddings is not None and output.text_embeddings is not None
        return clip_loss(
            output.image_embeddings, output.text_embeddings, output.logit_scale, distributed=self.distributed
        )


class SigLipLoss(nn.Module):
    """:func:`siglip_loss` on a model output."""

    def __init__(self, distributed: bool = False) -> None:
        super().__init__()
        self.distributed = distributed

    def forward(self, output: ClipOutput) -> Tensor:
        assert output.image_embeddings is not None and output.text_embeddings is not None
        return siglip_loss(
            output.image_embeddings,
            output.text_embeddings,
            output.logit_scale,
            output.logit_bias,
            distributed=self.distributed,
        )


def build_loss(name: str, distributed: bool = False) -> nn.Module:
    """``"clip"`` or ``"siglip"`` as a module taking a :class:`~clipcraft.model.ClipOutput`."""
    from clipcraft.errors import unknown_name

    if name == "clip":
        return ClipLoss(distributed)
    if name == "siglip":
        return SigLipLoss(distributed)
    raise unknown_name("loss", name, list(LOSS_NAMES))
