"""Embedding image files and captions for evaluation: batched, with loader workers, bad files skipped, cached.

Images are decoded and transformed (the model's eval :meth:`~clipcraft.model.ClipModel.image_transform`) in
DataLoader worker processes when there are many, so decoding overlaps the forward pass. A file that cannot be
read or decoded is skipped and reported (:attr:`ImageEmbeddings.failed`); one bad file never aborts a run.

The optional on-disk cache (:class:`EmbeddingCache`) keys every entry by the model's identity (config +
weights digest), the inputs (file paths with size and modification time, or the caption texts), the
preprocessing, and the output kind (embeddings or pre-projection features) and precision, so a repeated
evaluation reuses the vectors and any change to model, data or settings misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipcraft.errors import ClipcraftError, ImageLoadError
from clipcraft.precision import resolve_precision

# Fewer images than this are decoded in the main process: starting workers costs more than it saves.
MIN_IMAGES_FOR_WORKERS = 256


def default_workers(num_images: int) -> int:
    """DataLoader worker processes for ``num_images``: 0 for small sets, else half the CPUs (1 to 4)."""
    if num_images < MIN_IMAGES_FOR_WORKERS:
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass
class ImageEmbeddings:
    """Vectors for the images that decoded, and the ones that did not.

    ``vectors`` (N_ok, D) float32: unit-norm embeddings, or raw tower features (N_ok, F) when encoded with
    ``project=False``; ``kept`` (N_ok,) int64 positions of those images in the input list (ascending);
    ``failed`` (path, reason) for each skipped image.
    """

    vectors: np.ndarray
    kept: np.ndarray
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.failed)


class _ImageFiles:
    """Map-style dataset: position -> (position, (3, H, W) pixels or None, error message or "")."""

    def __init__(self, paths: Sequence[str], transform: Any) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str]:
        from clipcraft.images import load_image

        try:
            return i, self.transform(load_image(self.paths[i])), ""
        except ImageLoadError as exc:
            return i, None, str(exc)
        except Exception as exc:  # a decodable file the transform cannot handle: skip it, say why
            return i, None, f"Could not preprocess {self.paths[i]}: {type(exc).__name__}: {exc}"


def _collate(items: list[tuple[int, Any, str]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
    import torch

    ok = [(i, x) for i, x, err in items if not err]
    failed = [(i, err) for i, _, err in items if err]
    pixels = torch.stack([x for _, x in ok]) if ok else None  # (B_ok, 3, H, W)
    return [i for i, _ in ok], pixels, failed


def encode_image_files(
    model: Any,
    paths: Sequence[str | os.PathLike[str]],
    *,
    project: bool = True,
    batch_size: int = 64,
    precision: str = "auto",
    workers: int | None = None,
    progress: bool = False,
) -> ImageEmbeddings:
    """Embed image files in input order, skipping (and reporting) files that fail to load.

    ``project=True`` gives unit-norm embeddings (N_ok, D) (tower -> head -> L2 normalize); ``project=False``
    the image tower's pooled features (N_ok, F), not normalized. ``workers`` DataLoader processes decode and
    transform the images (None: :func:`default_workers`; 0: in this process). ``precision`` as in
    :func:`resolve_precision`. ``progress`` draws a bar on stderr.
    """
    import torch
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise ClipcraftError(f"batch_size must be >= 1; got {batch_size}.")
    files = [os.fspath(p) for p in paths]
    width = model.embed_dim if project else model.image_tower.num_features
    if not files:
        return ImageEmbeddings(np.zeros((0, width), np.float32), np.zeros(0, np.int64), [])
    precision = resolve_precision(precision, model.device)
    workers = default_workers(len(files)) if workers is None else max(0, int(workers))
    loader = DataLoader(
        _ImageFiles(files, model.image_transform(train=False)),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers else None,
    )
    out = np.empty((len(files), width), dtype=np.float32)
    ok_mask = np.zeros(len(files), dtype=bool)
    failed: list[tuple[str, str]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="embedding images", unit="img", file=sys.stderr)
    with model.inference(precision):
        for positions, pixels, bad in loader:
            failed += [(files[i], err) for i, err in bad]
            if pixels is not None:
                features = model.image_tower(pixels.to(model.device))  # (B, F)
                vectors = model.embed_image_features(features) if project else features  # (B, D) or (B, F)
                rows = torch.nn.functional.normalize(vectors.float(), dim=-1) if project else vectors.float()
                out[positions] = rows.cpu().numpy()
                ok_mask[positions] = True
            if bar is not None:
                bar.update(len(positions) + len(bad))
                bar.set_postfix(skipped=len(failed), refresh=False)
    if bar is not None:
        bar.close()
    kept = np.flatnonzero(ok_mask).astype(np.int64)
    return ImageEmbeddings(out[kept], kept, failed)


def encode_captions(
    model: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    precision: str = "auto",
    progress: bool = False,
) -> np.ndarray:
    """Unit-norm text embeddings (N, D) float32 for ``texts``, in order (see ``ClipModel.encode_texts``)."""
    precision = resolve_precision(precision, model.device)
    return model.encode_texts(
        list(texts), batch_size=batch_size, normalize=True, precision=precision, progress=progress
    )


# -- identity and cache -----------------------------------------------------------------------------------


def model_identity(model: Any) -> str:
    """sha256 over the model's config (sorted JSON) and every weight tensor (name, dtype, shape, bytes).

    Two models share it only when architecture, preprocessing and weights all match. About 1 s per GB.
    """
    import torch

    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_digest(paths: Sequence[str | os.PathLike[str]]) -> str:
    """sha256 over each path with its size and modification time (a missing file hashes as missing)."""
    digest = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{os.fspath(p)}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 over the captions, in order."""
    return hashlib.sha256(json.dumps(list(texts)).encode("utf-8", "surrogateescape")).hexdigest()


class EmbeddingCache:
    """A folder of ``.npz`` files, one per (model, inputs, settings) key. Entries are written atomically.

    ``hits`` and ``misses`` count lookups, so callers can report whether a run reused its embeddings.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(**parts: Any) -> str:
        """A 32-hex key for the given JSON-serializable parts (order-independent)."""
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}.npz"

    def load(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or None (a missing or unreadable entry is a miss)."""
        path = self.path(kind, key)
        try:
            with np.load(path, allow_pickle=False) as data:
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
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError as exc:
            raise ClipcraftError(f"Could not write the embedding cache {path}: {exc}") from exc
        return path


def image_embeddings(
    model: Any,
    paths: Sequence[str | os.PathLike[str]],
    *,
    cache: EmbeddingCache | None = None,
    identity: str | None = None,
    project: bool = True,
    batch_size: int = 64,
    precision: str = "auto",
    workers: int | None = None,
    progress: bool = False,
) -> ImageEmbeddings:
    """:func:`encode_image_files`, through ``cache`` when given (``identity``: a precomputed
    :func:`model_identity`, to hash the weights once per run)."""
    precision = resolve_precision(precision, model.device)
    if cache is None:
        return encode_image_files(
            model,
            paths,
            project=project,
            batch_size=batch_size,
            precision=precision,
            workers=workers,
            progress=progress,
        )
    key = cache.key(
        model=identity or model_identity(model),
        files=files_digest(paths),
        preprocess=_jsonable(model.image_tower.preprocess),
        output="embeddings" if project else "features",
        precision=precision,
    )
    hit = cache.load("images", key)
    if hit is not None:
        failed = list(zip(hit["failed_paths"].tolist(), hit["failed_reasons"].tolist(), strict=True))
        return ImageEmbeddings(hit["vectors"], hit["kept"], failed)
    result = encode_image_files(
        model,
        paths,
        project=project,
        batch_size=batch_size,
        precision=precision,
        workers=workers,
        progress=progress,
    )
    cache.save(
        "images",
        key,
        vectors=result.vectors,
        kept=result.kept,
        failed_paths=np.asarray([p for p, _ in result.failed], dtype=str),
        failed_reasons=np.asarray([r for _, r in result.failed], dtype=str),
    )
    return result


def text_embeddings(
    model: Any,
    texts: Sequence[str],
    *,
    cache: EmbeddingCache | None = None,
    identity: str | None = None,
    batch_size: int = 256,
    precision: str = "auto",
    progress: bool = False,
) -> np.ndarray:
    """:func:`encode_captions`, through ``cache`` when given."""
    precision = resolve_precision(precision, model.device)
    if cache is None:
        return encode_captions(model, texts, batch_size=batch_size, precision=precision, progress=progress)
    key = cache.key(model=identity or model_identity(model), texts=texts_digest(texts), precision=precision)
    hit = cache.load("texts", key)
    if hit is not None:
        return hit["vectors"]
    vectors = encode_captions(model, texts, batch_size=batch_size, precision=precision, progress=progress)
    cache.save("texts", key, vectors=vectors)
    return vectors


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return obj
