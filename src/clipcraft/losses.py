"""Contrastive losses over normalised embeddings, separate from the model.

Both losses take image embeddings (B, D) and text embeddings (B*k, D), L2-normalised, where text rows
i*k ... i*k+k-1 are the k captions of image i (k = 1: row i of each is a matching pair), and the model's
(already exponentiated) logit scale. With ``distributed=True`` inside an initialised
``torch.distributed`` process group, embeddings from all ranks are gathered *with gradient*; every rank must
pass the same batch size B and the same k.

Distributed contract: each rank returns the loss over its own rows against all N ranks' columns. The mean of
the N returned losses equals the single-process loss on the global batch of N*B pairs, and the gradients
reaching each rank's embeddings are N times the single-process gradients, so after DDP averages gradients
across ranks every parameter receives exactly the single-process gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipcraft.distributed import gather_with_grad, rank_and_world_size

if TYPE_CHECKING:
    from clipcraft.model import ClipOutput

LOSS_NAMES = ("clip", "siglip")


def _columns(image_emb: Tensor, text_emb: Tensor, distributed: bool) -> tuple[Tensor, Tensor, int]:
    """The column sets (all images, all texts) and this rank's image-row offset into the image columns."""
    rank, world = rank_and_world_size() if distributed else (0, 1)
    if world == 1:
        return image_emb, text_emb, 0
    return gather_with_grad(image_emb), gather_with_grad(text_emb), rank * image_emb.shape[0]


def _at_least_float32(image_emb: Tensor, text_emb: Tensor) -> tuple[Tensor, Tensor]:
    """Both embeddings in at least float32: half precision is promoted (the log-softmax over a large batch
    needs the range), float64 stays float64 (a caller who asked for it keeps its precision)."""
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    return image_emb.to(dtype), text_emb.to(dtype)


def captions_per_image(image_emb: Tensor, text_emb: Tensor) -> int:
    """k for image embeddings (B, D) and text embeddings (B*k, D); raises when the rows do not divide."""
    batch, texts = image_emb.shape[0], text_emb.shape[0]
    if batch == 0 or texts % batch:
        raise ValueError(f"text rows ({texts}) must be a whole multiple of image rows ({batch})")
    return texts // batch


def _positives(batch: int, k: int, offset: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(rows, columns) of the B*k matching pairs in the (B, N*B*k) image-to-text logits: image row i
    matches text columns (offset + i)*k ... (offset + i)*k + k-1."""
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    cols = (rows + offset) * k + torch.arange(k, device=device).repeat(batch)
    return rows, cols


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    *,
    distributed: bool = False,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Symmetric cross-entropy (CLIP / InfoNCE) over scaled cosine similarities.

    Args:
        image_emb: (B, D) normalised image embeddings.
        text_emb: (B*k, D) normalised text embeddings; rows i*k ... i*k+k-1 match image row i.
        logit_scale: scalar multiplier (exp of the learnable log scale).
        distributed: gather columns from all ranks (see the module docstring).
        label_smoothing: epsilon in [0, 1): each row's target keeps 1 - epsilon on its match(es) and spreads
            epsilon evenly over all of its columns (as ``F.cross_entropy(label_smoothing=...)``); 0 is CLIP.

    Returns: scalar loss in float32 (float64 for float64 inputs), the mean of the image->text and
    text->image cross-entropies. With k > 1 each image's target spreads evenly over its k captions (the mean
    of the k cross-entropies), and each caption's target is its image; k = 1 is the usual CLIP loss.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
    image_emb, text_emb = _at_least_float32(image_emb, text_emb)
    k = captions_per_image(image_emb, text_emb)
    all_images, all_texts, offset = _columns(image_emb, text_emb, distributed)
    logits_per_image = logit_scale * image_emb @ all_texts.T  # (B, N*B*k)
    logits_per_text = logit_scale * text_emb @ all_images.T  # (B*k, N*B)
    rows, cols = _positives(image_emb.shape[0], k, offset, image_emb.device)
    log_probs = logits_per_image.log_softmax(dim=1)  # (B, N*B*k)
    image_loss = -log_probs[rows, cols].mean()  # the k matches of each row, averaged
    if label_smoothing:
        image_loss = (1 - label_smoothing) * image_loss - label_smoothing * log_probs.mean()
    text_loss = F.cross_entropy(logits_per_text, rows + offset, label_smoothing=label_smoothing)
    return (image_loss + text_loss) / 2


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
    Shapes as for :func:`clip_loss` (with k captions per image, all k are matches); ``logit_bias`` is a
    scalar added to every logit. Computed in float32, or float64 for float64 inputs.
    """
    image_emb, text_emb = _at_least_float32(image_emb, text_emb)
    k = captions_per_image(image_emb, text_emb)
    _, all_texts, offset = _columns(image_emb, text_emb, distributed)
    batch = image_emb.shape[0]
    logits = logit_scale * image_emb @ all_texts.T + logit_bias  # (B, N*B*k)
    signs = -torch.ones_like(logits)
    signs[_positives(batch, k, offset, logits.device)] = 1.0
    return -F.logsigmoid(signs * logits).sum() / batch


class ClipLoss(nn.Module):
    """:func:`clip_loss` on a model output."""

    def __init__(self, distributed: bool = False, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.distributed = distributed
        self.label_smoothing = label_smoothing

    def forward(self, output: ClipOutput) -> Tensor:
        assert output.image_embeddings is not None and output.text_embeddings is not None
        return clip_loss(
            output.image_embeddings,
            output.text_embeddings,
            output.logit_scale,
            distributed=self.distributed,
            label_smoothing=self.label_smoothing,
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


def build_loss(name: str, distributed: bool = False, label_smoothing: float = 0.0) -> nn.Module:
    """``"clip"`` or ``"siglip"`` as a module taking a :class:`~clipcraft.model.ClipOutput`;
    ``label_smoothing`` applies to the softmax (CLIP) loss only (a sigmoid loss has no class distribution)."""
    from clipcraft.errors import unknown_name

    if label_smoothing and name != "clip":
        raise ValueError(f"label_smoothing applies to the clip loss, not {name!r}")
    if name == "clip":
        return ClipLoss(distributed, label_smoothing)
    if name == "siglip":
        return SigLipLoss(distributed)
    raise unknown_name("loss", name, list(LOSS_NAMES))
