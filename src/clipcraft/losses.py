"""Contrastive losses over normalised embeddings, separate from the model, and SLIP's image self-supervision
(:class:`SlipLoss`: the contrastive loss plus a SimCLR term, whose projection head the loss owns).

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

import dataclasses
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


def nt_xent_loss(view_a: Tensor, view_b: Tensor, temperature: float, *, distributed: bool = False) -> Tensor:
    """SimCLR's NT-Xent loss between two views of the same B samples.

    Each of the 2B vectors (row i of ``view_a`` and of ``view_b``, L2-normalised here) is a query whose
    positive is the other view of sample i and whose negatives are the other 2B - 2 vectors; the loss is the
    mean over the 2B queries of the cross-entropy of the positive against all vectors but the query itself,
    over cosine similarities divided by ``temperature``. With ``distributed=True`` the candidates are the
    2NB vectors of all ranks (gathered with gradient, as for :func:`clip_loss`, with the same contract: the
    mean of the ranks' losses is the single-process loss on the global batch).

    Args:
        view_a, view_b: (B, D) projections of the two views, any scale; B >= 1.
        temperature: > 0.

    Returns: scalar loss in float32 (float64 for float64 inputs). Raises ``ValueError`` for views of different
    shapes or a non-positive temperature.
    """
    if view_a.shape != view_b.shape or view_a.ndim != 2 or view_a.shape[0] == 0:
        raise ValueError(
            f"the two views must both be (B, D), B >= 1; got {tuple(view_a.shape)} and {tuple(view_b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    a, b = _at_least_float32(view_a, view_b)
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    all_a, all_b, offset = _columns(a, b, distributed)
    batch, total = a.shape[0], all_a.shape[0]
    logits = torch.cat([a, b]) @ torch.cat([all_a, all_b]).T / temperature  # (2B, 2NB)
    own = torch.arange(batch, device=a.device) + offset  # this rank's samples among the columns
    self_cols = torch.cat([own, own + total])  # each query's own column, left out of its softmax
    positive = torch.cat([own + total, own])  # the other view of the same sample
    query = torch.arange(2 * batch, device=a.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[query, self_cols] = True
    return F.cross_entropy(logits.masked_fill(is_self, float("-inf")), positive)


class SimClrLoss(nn.Module):
    """SLIP's image self-supervision: a projection MLP (the loss's own parameters, not the model's) on the
    image tower's pooled features, then :func:`nt_xent_loss` between two views.

    The MLP is SLIP's three layers (``in_features`` -> ``hidden`` -> ``hidden`` -> ``dim``; SLIP uses
    4096-4096-256 on ViT-B) with LayerNorm in place of SLIP's BatchNorm, so that a row's projection does not
    depend on the rest of the batch: gradient accumulation and the distributed split give the loss of the
    full batch.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 512,
        dim: int = 128,
        temperature: float = 0.1,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        if min(in_features, hidden, dim) < 1 or temperature <= 0:
            raise ValueError(
                f"SimCLR head sizes must be >= 1 and the temperature > 0; got in_features={in_features}, "
                f"hidden={hidden}, dim={dim}, temperature={temperature}"
            )
        self.head = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, dim),
        )
        self.temperature = temperature
        self.distributed = distributed

    def forward(self, features_a: Tensor, features_b: Tensor) -> Tensor:
        """(B, F) pooled features of view a and view b of the same B images -> scalar NT-Xent loss."""
        dtype = self.head[0].weight.dtype  # features from a bf16 autocast tower meet the head's own dtype
        return nt_xent_loss(
            self.head(features_a.to(dtype)),
            self.head(features_b.to(dtype)),
            self.temperature,
            distributed=self.distributed,
        )


class SlipLoss(nn.Module):
    """SLIP (arXiv 2112.12750): a contrastive image-text loss plus ``weight`` x :class:`SimClrLoss` on two
    views of each image.

    The output's image rows come in pairs: rows 2i and 2i+1 are two augmented views of image i (2B image
    rows for B images and their B*k text rows). View 0 (the even rows) is the image-text pair's view and
    meets the texts in ``contrastive``; the pooled features of both views meet in ``ssl``. So a step runs the
    image tower once more per image, not twice more as in SLIP, whose image-text view is a third one. With
    patch dropout both views are thinned independently: a further augmentation for the SimCLR term.
    ``last_ssl`` holds the last self-supervised term (detached), for the log.
    """

    views = 2

    def __init__(self, contrastive: nn.Module, ssl: SimClrLoss, weight: float) -> None:
        super().__init__()
        if weight <= 0:
            raise ValueError(f"a SLIP loss needs a positive self-supervision weight; got {weight}")
        self.contrastive = contrastive
        self.ssl = ssl
        self.weight = weight
        self.last_ssl = torch.zeros(())

    def forward(self, output: ClipOutput) -> Tensor:
        features, embeddings = output.image_features, output.image_embeddings
        if features is None or embeddings is None or features.shape[0] % 2:
            raise ValueError("SlipLoss needs the image features and embeddings of two views of every image")
        pair = dataclasses.replace(output, image_embeddings=embeddings[0::2], image_features=features[0::2])
        ssl = self.ssl(features[0::2], features[1::2])
        self.last_ssl = ssl.detach()
        return self.contrastive(pair) + self.weight * ssl


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
