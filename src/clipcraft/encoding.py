"""The one encoder: batched embedding (or tower features) of images and texts, for every caller.

``ClipModel.encode_images`` / ``encode_texts``, the search index, evaluation, ``classify``, the server,
training validation and the feature caches all encode through :func:`encode_images`, :func:`iter_images` and
:func:`encode_texts`, with one settings type (:class:`EncodeSettings`) and one result type (:class:`Encoded`).

Images: file paths (decoded in DataLoader worker processes, so decoding overlaps the forward pass), PIL
images, preprocessed pixel tensors ``(3, H, W)``, or one folder (every image file under it, sorted). An input
that cannot be read, decoded or transformed is skipped and reported (:attr:`Encoded.failed`); one bad file
never aborts a run. Texts: captions batched by length (longest first), so little time goes into padding.
Results keep the input order.

Precision is the caller's: settings carry a concrete :class:`~clipcraft.precision.Precision` (never ``auto``;
the edges resolve it), it is recorded in every result and it is part of every cache key.

Fast paths, each with a parity test against the plain path (tests/test_encoding.py, tests/test_model.py):

- The class-token shortcut: a ViT that pools its class token only needs token 0 out of the last block, so
  that block's attention runs with one query and its MLP on one token (keys and values still come from every
  token). Same arithmetic on fewer rows; for ViT-B/16 it skips about 7% of the FLOPs. Used by default where
  the tower allows it (see :func:`shortcut_unavailable`).
- Length-bucketed text batches.
- Worker decoding of image files.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipcraft.data.decode import BadImageError, decode_image
from clipcraft.data.report import UNREADABLE_IMAGE, BadItem
from clipcraft.digests import files_digest, json_digest, model_identity
from clipcraft.errors import ClipcraftError
from clipcraft.files import atomic_file
from clipcraft.precision import Precision, as_precision

if TYPE_CHECKING:
    from PIL import Image

    from clipcraft.model import ClipModel

# An image input: a file path, a PIL image, or a preprocessed (3, H, W) pixel tensor.
ImageItem = Union[str, os.PathLike, "Image.Image", Tensor]  # noqa: UP007 (runtime alias, Python 3.10)
Output = Literal["embeddings", "features"]
OUTPUTS = ("embeddings", "features")

# Fewer images than this are decoded in the main process: starting workers costs more than it saves.
MIN_IMAGES_FOR_WORKERS = 256


def default_workers(num_images: int | None = None) -> int:
    """DataLoader worker processes for ``num_images`` (None: many): 0 below :data:`MIN_IMAGES_FOR_WORKERS`,
    else half the CPUs (1 to 8); the other half run the model."""
    if num_images is not None and num_images < MIN_IMAGES_FOR_WORKERS:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# -- settings and result ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeSettings:
    """How inputs are encoded. Only :meth:`key` (output and precision) changes the vectors; the rest is speed.

    ``precision`` must be concrete (fp32 or bf16): resolve the user's ``auto`` with
    :func:`clipcraft.precision.resolve_precision` first.
    """

    output: Output = (
        "embeddings"  # unit-norm embeddings (tower -> head -> L2); "features": raw pooled tower output
    )
    precision: Precision = Precision.FP32  # what the towers run in; the vectors are float32 either way
    batch_size: int = 64  # images per forward pass
    text_batch_size: int = 256  # captions per forward pass
    workers: int | None = (
        None  # image loader processes; None: default_workers(number of files); 0: this process
    )
    shortcut: bool | None = None  # the class-token shortcut; None: wherever the tower allows it
    progress: bool = False  # a progress bar on stderr

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ClipcraftError(f"output must be one of {', '.join(OUTPUTS)}; got {self.output!r}.")
        object.__setattr__(self, "precision", as_precision(self.precision))
        for name in ("batch_size", "text_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ClipcraftError(f"{name} must be >= 1; got {getattr(self, name)}.")

    def key(self) -> dict[str, str]:
        """What the vectors depend on besides model and inputs: part of every cache key."""
        return {"output": self.output, "precision": self.precision.value}


@dataclass
class Encoded:
    """Vectors of the inputs that could be encoded, and why the others could not.

    ``vectors`` (N_kept, D) float32 unit-norm embeddings, or (N_kept, F) raw tower features
    (``output == "features"``); row ``j`` belongs to input ``kept[j]`` ((N_kept,) int64, ascending).
    ``failed``: a :class:`BadItem` per input that did not load (``index`` = its input position).
    ``inputs``: a name per input (the file path, or ``<image 3>``), ``precision``: what the towers ran in.
    """

    vectors: np.ndarray
    kept: np.ndarray
    failed: list[BadItem]
    inputs: list[str]
    output: Output
    precision: Precision

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_skipped(self) -> int:
        return len(self.failed)

    @property
    def ok(self) -> np.ndarray:
        """(N,) bool: which inputs were encoded."""
        mask = np.zeros(self.num_inputs, dtype=bool)
        mask[self.kept] = True
        return mask

    def dense(self) -> np.ndarray:
        """(N, W) float32 with a row per input: zeros where the input failed."""
        out = np.zeros((self.num_inputs, self.vectors.shape[1]), dtype=np.float32)
        out[self.kept] = self.vectors
        return out

    def check_all(self) -> Encoded:
        """``self`` when every input was encoded; else :class:`~clipcraft.errors.ImageLoadError` naming the
        first input that failed and why (for callers that need a row per input)."""
        if self.failed:
            from clipcraft.errors import ImageLoadError

            bad = self.failed[0]
            more = f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
            raise ImageLoadError(f"Could not load image {bad.where}: {bad.reason}{more}")
        return self


@dataclass
class EncodedBatch:
    """The vectors of one loader batch: row ``j`` of ``vectors`` belongs to input ``positions[j]``;
    ``failed`` holds the inputs of this batch that did not load."""

    positions: list[int]
    vectors: np.ndarray  # (len(positions), D or F) float32
    failed: list[BadItem] = field(default_factory=list)


def _width(model: ClipModel, output: Output, tower: nn.Module) -> int:
    return model.embed_dim if output == "embeddings" else int(tower.num_features)  # type: ignore[arg-type]


# -- image inputs -------------------------------------------------------------------------------------------


def image_inputs(images: Sequence[ImageItem] | ImageItem) -> list[ImageItem]:
    """The list of image inputs: a folder becomes its image files (sorted, hidden ones skipped), a single
    path, PIL image or (3, H, W) tensor a list of one, a (B, 3, H, W) tensor B items."""
    if isinstance(images, Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            from clipcraft.data.folder import scan_images

            return [str(path / entry.path) for entry in scan_images(path)]
        return [os.fspath(images)]
    if hasattr(images, "mode") and hasattr(images, "size"):  # one PIL image
        return [images]  # type: ignore[list-item]
    return list(images)  # type: ignore[arg-type]


def _name(item: ImageItem, position: int) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"<image {position}>"


class _ImageItems(torch.utils.data.Dataset):
    """Map-style dataset over image inputs: ``i -> (i, (3, H, W) pixels, None)`` or ``(i, None, BadItem)``."""

    def __init__(self, items: Sequence[ImageItem], transform: Any) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, BadItem | None]:
        from clipcraft.images import to_rgb

        item = self.items[i]
        where = _name(item, i)
        try:
            if isinstance(item, Tensor):
                return i, item, None  # already preprocessed
            if isinstance(item, (str, os.PathLike)):
                image = decode_image(item)
            elif hasattr(item, "mode"):
                image = to_rgb(item)  # type: ignore[arg-type]
            else:
                reason = f"expected a file path, a PIL image or a pixel tensor, got {type(item).__name__}"
                return i, None, BadItem(i, UNREADABLE_IMAGE, where, reason)
            return i, self.transform(image), None
        except BadImageError as exc:
            return i, None, BadItem(i, exc.kind, exc.where, exc.reason)
        except Exception as exc:  # a decodable image the transform cannot handle: skip it, say why
            reason = f"could not preprocess: {type(exc).__name__}: {exc}"
            return i, None, BadItem(i, UNREADABLE_IMAGE, where, reason)


@dataclass
class _LoadedBatch:
    positions: list[int]
    pixels: Tensor | None  # (B_ok, 3, H, W); None when every input of the batch failed
    failed: list[BadItem]


def _collate(items: list[tuple[int, Tensor | None, BadItem | None]]) -> _LoadedBatch:
    ok = [(i, x) for i, x, bad in items if bad is None]
    pixels = torch.stack([x for _, x in ok]) if ok else None  # type: ignore[misc]  # (B_ok, 3, H, W)
    return _LoadedBatch([i for i, _ in ok], pixels, [bad for _, _, bad in items if bad is not None])


def image_loader(items: Sequence[ImageItem], transform: Any, *, batch_size: int, workers: int) -> Any:
    """Batches of :class:`_LoadedBatch` in input order; ``workers`` processes decode (0: this process).

    The loader draws its worker seeds from its own generator, so iterating it leaves the global RNG alone
    (training validates between steps and must stay reproducible).
    """
    return torch.utils.data.DataLoader(
        _ImageItems(items, transform),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
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


# -- the model steps ------------------------------------------------------------------------------------------


def encode_pixels(
    model: ClipModel,
    pixels: Tensor,
    *,
    output: Output = "embeddings",
    precision: Precision = Precision.FP32,
    shortcut: bool = False,
) -> np.ndarray:
    """(B, 3, H, W) normalized pixels -> (B, D) float32 unit-norm embeddings (tower -> head -> L2), or with
    ``output="features"`` the (B, F) float32 pooled tower features, not normalized. No gradients; the model's
    train/eval mode is restored. ``shortcut`` must only be True where :func:`shortcut_unavailable` is None."""
    from clipcraft.towers import matmul_precision_context

    with model.inference(as_precision(precision)):
        pixels = pixels.to(model.device)
        if shortcut:
            with matmul_precision_context():
                features = _class_token_trunk(model.image_tower.trunk)(pixels)  # (B, F)
        else:
            features = model.image_tower(pixels)  # (B, F)
        if output == "features":
            return features.float().cpu().numpy()
        embeddings = model.image_head(features)  # (B, D)
        return F.normalize(embeddings.float(), dim=-1).cpu().numpy()  # normalized in fp32 after bf16


def _encode_tokens(model: ClipModel, texts: list[str], output: Output, precision: Precision) -> np.ndarray:
    """One batch of captions -> (b, D) float32 unit-norm embeddings or (b, F) raw text tower features."""
    with model.inference(precision):
        tokens = {k: v.to(model.device) for k, v in model.tokenize(texts).items()}
        features = model.text_tower(tokens["input_ids"], tokens["attention_mask"])  # (b, F)
        if output == "features":
            return features.float().cpu().numpy()
        return F.normalize(model.text_head(features).float(), dim=-1).cpu().numpy()  # (b, D)


def embed_features(
    model: ClipModel, features: np.ndarray, side: Literal["image", "text"], precision: Precision
) -> np.ndarray:
    """(N, F) tower features (from :func:`encode_texts` or :func:`encode_images` with ``output="features"``)
    -> (N, D) float32 unit-norm embeddings through that side's head, without running the tower again."""
    head = model.image_head if side == "image" else model.text_head
    with model.inference(as_precision(precision)):
        projected = head(torch.from_numpy(np.ascontiguousarray(features)).to(model.device))  # (N, D)
        return F.normalize(projected.float(), dim=-1).cpu().numpy()


# -- encoding ---------------------------------------------------------------------------------------------


def iter_images(
    model: ClipModel, images: Sequence[ImageItem] | ImageItem, settings: EncodeSettings | None = None
) -> Iterator[EncodedBatch]:
    """Encode images batch by batch, in input order (see :func:`encode_pixels` for the vectors), so a caller
    can save progress between batches. No cache. Inputs as in :func:`image_inputs`."""
    s = settings or EncodeSettings()
    items = image_inputs(images)
    if not items:
        return
    shortcut = resolve_shortcut(model, s.shortcut) if s.output == "embeddings" or s.shortcut else False
    files = sum(isinstance(x, (str, os.PathLike)) for x in items)
    workers = default_workers(files) if s.workers is None else max(0, int(s.workers))
    if files < len(items):
        workers = 0  # in-memory images are not worth shipping to worker processes
    loader = image_loader(items, model.image_transform(train=False), batch_size=s.batch_size, workers=workers)
    width = _width(model, s.output, model.image_tower)
    for batch in loader:
        if batch.pixels is None:
            vectors = np.zeros((0, width), dtype=np.float32)
        else:
            vectors = encode_pixels(
                model, batch.pixels, output=s.output, precision=s.precision, shortcut=shortcut
            )
        yield EncodedBatch(batch.positions, vectors, batch.failed)


def encode_images(
    model: ClipModel,
    images: Sequence[ImageItem] | ImageItem,
    settings: EncodeSettings | None = None,
    *,
    cache: EncodingCache | None = None,
    identity: str | None = None,
) -> Encoded:
    """Encode images (paths, PIL images, (3, H, W) pixel tensors, or a folder), skipping and reporting the
    ones that fail. With ``cache`` the result is read from / written to that :class:`EncodingCache`, keyed
    on the model (``identity``: a precomputed :func:`~clipcraft.digests.model_identity`), the files (path,
    size, mtime), the preprocessing and :meth:`EncodeSettings.key`; in-memory inputs are not cached."""
    s = settings or EncodeSettings()
    items = image_inputs(images)
    names = [_name(x, i) for i, x in enumerate(items)]
    key = None
    if cache is not None and all(isinstance(x, (str, os.PathLike)) for x in items):
        key = cache.key(
            model=identity or model_identity(model),
            files=files_digest(names),
            preprocess=json_digest(model.config.image.preprocess),
            **s.key(),
        )
        hit = cache.load("images", key)
        if hit is not None:
            failed = [BadItem(int(i), str(k), names[int(i)], str(r)) for i, k, r in hit["failed"]]
            return Encoded(hit["vectors"], hit["kept"], failed, names, s.output, s.precision)
    width = _width(model, s.output, model.image_tower)
    chunks, kept, failed = [], [], []
    bar = _bar(s, len(items), "embedding images" if s.output == "embeddings" else "image features", "img")
    for batch in iter_images(model, items, s):
        chunks.append(batch.vectors)
        kept += batch.positions
        failed += batch.failed
        if bar is not None:
            bar.update(len(batch.positions) + len(batch.failed))
            bar.set_postfix(skipped=len(failed), refresh=False)
    if bar is not None:
        bar.close()
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)
    result = Encoded(vectors, np.asarray(kept, dtype=np.int64), failed, names, s.output, s.precision)
    if cache is not None and key is not None:
        table = np.asarray([(str(b.index), b.kind, b.reason) for b in failed], dtype=str).reshape(-1, 3)
        cache.save("images", key, vectors=result.vectors, kept=result.kept, failed=table)
    return result


def encode_texts(
    model: ClipModel,
    texts: Sequence[str] | str,
    settings: EncodeSettings | None = None,
    *,
    cache: EncodingCache | None = None,
    identity: str | None = None,
) -> Encoded:
    """Encode captions in input order, batched by length (longest first; the fast path, parity-tested
    against one caption at a time). Captions longer than the tower's ``max_length`` tokens are truncated.
    A single string is a list of one; an item that is not a string raises ``TypeError``. Cached like
    :func:`encode_images` (keyed on the model, the texts and :meth:`EncodeSettings.key`)."""
    s = settings or EncodeSettings()
    items = [texts] if isinstance(texts, str) else list(texts)
    bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"encode_texts takes strings; item {bad[0]} is {type(items[bad[0]]).__name__}.")
    key = None
    kept = np.arange(len(items), dtype=np.int64)
    if cache is not None:
        key = cache.key(model=identity or model_identity(model), texts=json_digest(items), **s.key())
        hit = cache.load("texts", key)
        if hit is not None:
            return Encoded(hit["vectors"], kept, [], items, s.output, s.precision)
    width = _width(model, s.output, model.text_tower)
    out = np.empty((len(items), width), dtype=np.float32)
    order = np.argsort([-len(t) for t in items], kind="stable")  # similar lengths share a batch
    starts = range(0, len(items), s.text_batch_size)
    bar = _bar(s, len(items), "embedding texts" if s.output == "embeddings" else "text features", "text")
    for start in starts:
        rows = order[start : start + s.text_batch_size]
        out[rows] = _encode_tokens(model, [items[i] for i in rows], s.output, s.precision)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    result = Encoded(out, kept, [], items, s.output, s.precision)
    if cache is not None and key is not None:
        cache.save("texts", key, vectors=out)
    return result


def _bar(settings: EncodeSettings, total: int, desc: str, unit: str) -> Any:
    if not (settings.progress and total):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


def with_settings(settings: EncodeSettings, **changes: Any) -> EncodeSettings:
    """A copy of ``settings`` with ``changes`` (validated like a new one)."""
    return replace(settings, **changes)


# -- the cache --------------------------------------------------------------------------------------------


class EncodingCache:
    """A folder of ``.npz`` files, one per (model, inputs, :meth:`EncodeSettings.key`) key, written atomically.

    ``hits`` and ``misses`` count lookups, so callers can report whether a run reused its vectors. An entry
    that cannot be read is a miss.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(**parts: Any) -> str:
        """A 32-hex key for the given JSON-serializable parts (order-independent)."""
        return json_digest(parts)[:32]

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}.npz"

    def load(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or None."""
        try:
            with np.load(self.path(kind, key), allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError):
            self.misses += 1
            return None
        self.hits += 1
        return arrays

    def save(self, kind: str, key: str, **arrays: np.ndarray) -> Path:
        path = self.path(kind, key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as fh:
                np.savez(fh, **arrays)
        except OSError as exc:
            raise ClipcraftError(f"Could not write the encoding cache {path}: {exc}") from exc
        return path
