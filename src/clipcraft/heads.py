"""Projection heads: tower features (B, F) -> shared-space vectors (B, D), before normalisation."""

from __future__ import annotations

from torch import Tensor, nn

from clipcraft.config import HeadConfig
from clipcraft.errors import ClipcraftError, unknown_name

HEAD_KINDS = ("linear", "mlp", "plain_mlp", "none")


class LinearHead(nn.Module):
    """CLIP's head: one bias-free linear map."""

    def __init__(self, in_features: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, embed_dim, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        return self.proj(features)  # (B, D)


class MLPHead(nn.Module):
    """The seed's head: Linear -> GELU -> Linear -> dropout, plus a residual from the first projection,
    then LayerNorm."""

    def __init__(self, in_features: int, embed_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, embed_dim)
        self.act = nn.GELU()
        self.fc = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, features: Tensor) -> Tensor:
        projected = self.proj(features)  # (B, D)
        x = self.dropout(self.fc(self.act(projected)))  # (B, D)
        return self.norm(x + projected)


class PlainMLPHead(nn.Module):
    """Linear -> GELU -> Linear, both without bias, through a hidden width halfway between the two ends:
    open_clip's ``mlp`` projection after a transformers text tower. No dropout, residual or norm."""

    def __init__(self, in_features: int, embed_dim: int) -> None:
        super().__init__()
        hidden = (in_features + embed_dim) // 2
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, embed_dim, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(features)))  # (B, D)


class IdentityHead(nn.Module):
    """No projection: the tower's features are already in the shared space (SigLIP's towers end in their own
    heads). No parameters."""

    def forward(self, features: Tensor) -> Tensor:
        return features  # (B, D)


def build_head(config: HeadConfig, in_features: int, embed_dim: int, tower: str = "image") -> nn.Module:
    """``tower``'s head (``config.kind_of(tower)``: ``"image"`` or ``"text"``); unknown kinds raise with the
    list of known ones. ``none`` needs ``in_features == embed_dim``."""
    kind = config.kind_of(tower)
    if kind == "none":
        if in_features != embed_dim:
            raise ClipcraftError(
                f"Head kind 'none' passes features through, so the tower's {in_features} features must equal "
                f"embed_dim={embed_dim}; use a linear or mlp head."
            )
        return IdentityHead()
    if kind == "linear":
        return LinearHead(in_features, embed_dim)
    if kind == "mlp":
        return MLPHead(in_features, embed_dim, config.dropout)
    if kind == "plain_mlp":
        return PlainMLPHead(in_features, embed_dim)
    raise unknown_name("head kind", kind, list(HEAD_KINDS))
