"""Encoding image files with a model: one batched loop that every caller shares.

Files are decoded and transformed (the model's eval transform) in DataLoader worker processes, so decoding
overlaps the forward pass; the model turns each batch into unit-norm embeddings or raw tower features. A file
that cannot be read, decoded or transformed is skipped and reported as a
:class:`~clipcraft.data.report.BadItem` (kind, file, reason); one bad file never aborts a run. Results keep
the input order.

Used by the search index (:mod:`clipcraft.search.embed`), evaluation (:mod:`clipcraft.evaluation.embeddings`)
and the training feature cache and validation (:mod:`clipcraft.train.features`).

The class-token shortcut: a ViT that pools its class token only needs token 0 out of the last block, so the
loop can run that block's attention with one query and its MLP on one token (keys and values still come from
every token). Same arithmetic on fewer rows, so the same vectors up to float rounding; for ViT-B/16 it skips
about 7% of the FLOPs. It is used by default where the tower allows it (see :func:`shortcut_unavailable`).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipcraft.data.decode import BadImageError, decode_image
from clipcraft.data.report import UNREADABLE_IMAGE, BadItem
from clipcraft.errors import ClipcraftError
from clipcraft.precision import resolve_precision

if TYPE_CHECKING:
    from clipcraft.model import ClipModel

# Fewer images than this are decoded in the main process: starting workers costs more than it saves.
MIN_IMAGES_FOR_WORKERS = 256


def default_workers(num_images: int | None = None) -> int:
    """DataLoader worker processes for ``num_images`` (None: many): 0 below :data:`MIN_IMAGES_FOR_WORKERS`,
    else half the CPUs (1 to 8); the other half run the model."""
    if num_images is not None and num_images < MIN_IMAGES_FOR_WORKERS:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# -- loading ------------------------------------------------------------------------------------------------


class ImageFiles(torch.utils.data.Dataset):
    """Map-style dataset over file paths: ``i -> (i, (3, H, W) pixels, None)`` or ``(i, None, BadItem)``."""

    def __init__(self, paths: Sequence[str], transform: Any) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, BadItem | None]:
        path = self.paths[i]
        try:
            return i, self.transform(decode_image(path)), None
        except BadImageError as exc:
            return i, None, BadItem(i, exc.kind, exc.where, exc.reason)
        except Exception as exc:  # a decodable image the transform cannot handle: skip it, say why
            return (
                i,
                None,
                BadItem(i, UNREADABLE_IMAGE, path, f"could not preprocess: {type(exc).__name__}: {exc}"),
            )


@dataclass
class FileBatch:
    """One loader batch: ``pixels`` (B_ok, 3, H, W) of the files at input ``positions`` (None when every file
    failed) and a :class:`BadItem` for each file that did not load (``index`` is its input position)."""

    positions: list[int]
    pixels: Tensor | None
    failed: list[BadItem]


def collate_files(items: list[tuple[int, Tensor | None, BadItem | None]]) -> FileBatch:
    """Stack the loaded images of a batch; keep the failures aside."""
    ok = [(i, x) for i, x, bad in items if bad is None]
    pixels = torch.stack([x for _, x in ok]) if ok else None  # type: ignore[misc]  # (B_ok, 3, H, W)
    return FileBatch([i for i, _ in ok], pixels, [bad for _, _, bad in items if bad is not None])


def file_loader(
    paths: Sequence[str], transform: Any, *, batch_size: int, workers: int
) -> torch.utils.data.DataLoader:
    """Batches of :class:`FileBatch` in input order; ``workers`` processes decode (0: this process).

    The loader draws its worker seeds from its own generator, so iterating it leaves the global RNG alone
    (training calls this between steps and must stay reproducible).
    """
    return torch.utils.data.DataLoader(
        ImageFiles(paths, transform),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_files,
        prefetch_factor=2 if workers else None,
        generator=torch.Generator().manual_seed(0),
    )


# -- the class-token shortcut ---------------------------------------------------------------------------------


def shortcut_unavailable(model: ClipModel) -> str | None:
    """Why the class-token shortcut cannot run on ``model``'s image tower, or None when it can.

    It needs a timm ``VisionTransformer`` (exactly that class) pooling the class token, whose last block is a
    plain timm ``Block`` with standard ``Attention``: anything else might compute its output differently.
    """
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    trunk = getattr(model.image_tower, "trunk", None)
    if type(trunk) is not VisionTransformer:
        return f"the image tower is a {type(trunk).__name__}, not a timm VisionTransformer"
    if trunk.global_pool != "token" or getattr(trunk, "attn_pool", None) is not None:
        return f"the image tower pools with {trunk.global_pool!r}, not the class token"
    last = trunk.blocks[-1] if isinstance(trunk.blocks, nn.Sequential) and len(trunk.blocks) else None
    if (
        type(last) is not Block
        or type(last.attn) is not Attention
        or getattr(last.attn, "gate", None) is not None
    ):
        return "the image tower's last block is not a plain timm Block with standard attention"
    return None


def resolve_shortcut(model: ClipModel, shortcut: bool | None) -> bool:
    """Whether to use the class-token shortcut: ``None`` where the tower allows it, ``False`` never, ``True``
    where it can (with a warning naming the reason where it cannot: the full forward runs instead)."""
    if shortcut is False:
        return False
    reason = shortcut_unavailable(model)
    if reason is not None and shortcut:
        warnings.warn(
            f"The class-token shortcut is not available: {reason}. Running the full image tower instead "
            "(same embeddings, a little slower).",
            stacklevel=3,
        )
    return reason is None


class _ClassTokenBlock(nn.Module):
    """A timm ViT ``Block`` evaluated for token 0 only: (B, N, C) -> (B, 1, C). Inference only (no dropout).

    Keys and values come from every token, so token 0's output is the full block's; the N - 1 other outputs,
    which class-token pooling throws away, are never computed.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        block, attn = self.block, self.block.attn
        y = block.norm1(x)  # (B, N, C)
        b, n, _ = y.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        width = heads * head_dim
        w, bias = attn.qkv.weight, attn.qkv.bias  # (3 * width, C): the query rows, then keys, then values
        kv = F.linear(y, w[width:], None if bias is None else bias[width:])  # (B, N, 2 * width)
        k, v = kv.reshape(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) each
        q = F.linear(y[:, :1], w[:width], None if bias is None else bias[:width])  # (B, 1, width)
        q = q.reshape(b, 1, heads, head_dim).transpose(1, 2)  # (B, H, 1, hd)
        out = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v)  # (B, H, 1, hd)
        out = attn.proj(attn.norm(out.transpose(1, 2).reshape(b, 1, width)))  # (B, 1, C)
        x = x[:, :1] + block.ls1(out)
        return x + block.ls2(block.mlp(block.norm2(x)))


def _class_token_trunk(trunk: nn.Module) -> nn.Module:
    """A view of ``trunk`` (same weights, timm's own forward) whose last block computes token 0 only.

    The copy has its own module table, so the model itself is never modified.
    """
    view = copy.copy(trunk)
    view._modules = dict(trunk._modules)
    view._modules["blocks"] = nn.Sequential(*trunk.blocks[:-1], _ClassTokenBlock(trunk.blocks[-1]))
    return view


# -- encoding -----------------------------------------------------------------------------------------------


def encode_pixels(
    model: ClipModel,
    pixels: Tensor,
    *,
    project: bool = True,
    precision: str = "fp32",
    shortcut: bool = False,
) -> np.ndarray:
    """(B, 3, H, W) normalized pixels -> (B, D) float32 unit-norm embeddings (tower -> head -> L2), or with
    ``project=False`` the (B, F) float32 pooled tower features, not normalized. No gradients; the model's
    train/eval mode is restored. ``shortcut`` must only be True where :func:`shortcut_unavailable` is None."""
    from clipcraft.towers import matmul_precision_context

    with model.inference(precision):
        pixels = pixels.to(model.device)
        if shortcut:
            with matmul_precision_context():
                features = _class_token_trunk(model.image_tower.trunk)(pixels)  # (B, F)
        else:
            features = model.image_tower(pixels)  # (B, F)
        if not project:
            return features.float().cpu().numpy()
        embeddings = model.embed_image_features(features)  # (B, D)
        return F.normalize(embeddings.float(), dim=-1).cpu().numpy()  # re-normalized in fp32 after bf16


@dataclass(frozen=True)
class EncodeSettings:
    """How a list of files is encoded."""

    project: bool = True  # unit-norm embeddings (tower -> head -> L2); False: raw pooled tower features
    batch_size: int = 64  # images per forward pass
    workers: int | None = None  # loader processes; None: default_workers(number of files); 0: this process
    precision: str = "auto"  # as in clipcraft.precision.resolve_precision
    shortcut: bool | None = None  # the class-token shortcut; None: wherever the tower allows it


@dataclass
class EncodedBatch:
    """The vectors of one loader batch: row ``j`` of ``vectors`` belongs to input ``positions[j]``;
    ``failed`` holds the inputs of this batch that did not load."""

    positions: list[int]
    vectors: np.ndarray  # (len(positions), D or F) float32
    failed: list[BadItem] = field(default_factory=list)


def _width(model: ClipModel, project: bool) -> int:
    return model.embed_dim if project else model.image_tower.num_features


def iter_encoded(
    model: ClipModel, paths: Sequence[str | os.PathLike[str]], settings: EncodeSettings | None = None
) -> Iterator[EncodedBatch]:
    """Encode image files batch by batch, in input order (see :func:`encode_pixels` for the vectors).

    Yields one :class:`EncodedBatch` per loader batch, so a caller can save progress between batches.
    ``settings``: :class:`EncodeSettings` (None: the defaults). Raises :class:`ClipcraftError` for a batch
    size under 1 or an unknown precision.
    """
    s = settings or EncodeSettings()
    if s.batch_size < 1:
        raise ClipcraftError(f"batch_size must be >= 1; got {s.batch_size}.")
    files = [os.fspath(p) for p in paths]
    if not files:
        return
    precision = resolve_precision(s.precision, model.device)
    shortcut = resolve_shortcut(model, s.shortcut)
    workers = default_workers(len(files)) if s.workers is None else max(0, int(s.workers))
    loader = file_loader(files, model.image_transform(train=False), batch_size=s.batch_size, workers=workers)
    for batch in loader:
        if batch.pixels is None:
            vectors = np.zeros((0, _width(model, s.project)), dtype=np.float32)
        else:
            vectors = encode_pixels(
                model, batch.pixels, project=s.project, precision=precision, shortcut=shortcut
            )
        yield EncodedBatch(batch.positions, vectors, batch.failed)


@dataclass
class EncodedFiles:
    """Vectors of a whole file list: ``vectors`` (N, D or F) float32 with zero rows where ``ok`` (N,) is
    False, and the :class:`BadItem` of each file that did not load, in input order."""

    vectors: np.ndarray
    ok: np.ndarray
    failed: list[BadItem]


def encode_files(
    model: ClipModel,
    paths: Sequence[str | os.PathLike[str]],
    settings: EncodeSettings | None = None,
    *,
    progress: bool = False,
) -> EncodedFiles:
    """:func:`iter_encoded` collected into one array; ``progress`` draws a bar on stderr."""
    s = settings or EncodeSettings()
    out = np.zeros((len(paths), _width(model, s.project)), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    failed: list[BadItem] = []
    bar = None
    if progress and len(paths):
        from tqdm.auto import tqdm

        desc = "embedding images" if s.project else "image features"
        bar = tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr)
    for batch in iter_encoded(model, paths, s):
        out[batch.positions] = batch.vectors
        ok[batch.positions] = True
        failed += batch.failed
        if bar is not None:
            bar.update(len(batch.positions) + len(batch.failed))
            bar.set_postfix(skipped=len(failed), refresh=False)
    if bar is not None:
        bar.close()
    return EncodedFiles(out, ok, failed)
