"""Projection heads: tower features (B, F) -> shared-space vectors (B, D), before normalisation."""

from __future__ import annotations

from torch import Tensor, nn

from clipcraft.config import HeadConfig
from clipcraft.errors import ClipcraftError, unknown_name

HEAD_KINDS = ("linear", "mlp", "none")


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


class IdentityHead(nn.Module):
    """No projection: the tower's features are already in the shared space (SigLIP's towers end in their own
    heads). No parameters."""

    def forward(self, features: Tensor) -> Tensor:
        return features  # (B, D)


def build_head(config: HeadConfig, in_features: int, embed_dim: int) -> nn.Module:
    """The head named by ``config.kind``; unknown kinds raise with the list of known ones. ``none`` needs
    ``in_features == embed_dim``."""
    if config.kind == "none":
        if in_features != embed_dim:
            raise ClipcraftError(
                f"Head kind 'none' passes features through, so the tower's {in_features} features must equal "
                f"embed_dim={embed_dim}; use a linear or mlp head."
            )
        return IdentityHead()
    if config.kind == "linear":
        return LinearHead(in_features, embed_dim)
    if config.kind == "mlp":
        return MLPHead(in_features, embed_dim, config.dropout)
    raise unknown_name("head kind", config.kind, list(HEAD_KINDS))
