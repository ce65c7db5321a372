"""Embedding image files and captions for evaluation: batched, with loader workers, bad files skipped, cached.

Images go through the shared loop of :mod:`clipcraft.encoding`: DataLoader workers decode and transform them
(the model's eval :meth:`~clipcraft.model.ClipModel.image_transform`) while the model runs. A file that cannot
be read or decoded is skipped and reported (:attr:`ImageEmbeddings.failed`); one bad file never aborts a run.

The optional on-disk cache (:class:`EmbeddingCache`) keys every entry by the model's identity (config +
weights digest), the inputs (file paths with size and modification time, or the caption texts), the
preprocessing, and the output kind (embeddings or pre-projection features) and precision, so a repeated
evaluation reuses the vectors and any change to model, data or settings misses the cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipcraft.digests import files_digest, json_digest, model_identity
from clipcraft.errors import ClipcraftError
from clipcraft.precision import resolve_precision

__all__ = [
    "EmbeddingCache",
    "ImageEmbeddings",
    "encode_captions",
    "encode_image_files",
    "files_digest",
    "image_embeddings",
    "model_identity",
    "text_embeddings",
    "texts_digest",
]


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


def encode_image_files(
    model: Any,
    paths: Sequence[str | os.PathLike[str]],
    *,
    project: bool = True,
    batch_size: int = 64,
    precision: str = "auto",
    workers: int | None = None,
    progress: bool = False,
    shortcut: bool | None = None,
) -> ImageEmbeddings:
    """Embed image files in input order, skipping (and reporting) files that fail to load.

    ``project=True`` gives unit-norm embeddings (N_ok, D) (tower -> head -> L2 normalize); ``project=False``
    the image tower's pooled features (N_ok, F), not normalized. ``workers`` DataLoader processes decode and
    transform the images (None: :func:`clipcraft.encoding.default_workers`; 0: in this process). ``precision`` as in
    :func:`resolve_precision`; ``shortcut`` as in :func:`clipcraft.encoding.resolve_shortcut`. ``progress``
    draws a bar on stderr.
    """
    from clipcraft.encoding import EncodeSettings, encode_files

    files = [os.fspath(p) for p in paths]
    settings = EncodeSettings(
        project=project, batch_size=batch_size, workers=workers, precision=precision, shortcut=shortcut
    )
    result = encode_files(model, files, settings, progress=progress)
    kept = np.flatnonzero(result.ok).astype(np.int64)
    failed = [(files[bad.index], bad.reason) for bad in result.failed]
    return ImageEmbeddings(result.vectors[kept], kept, failed)


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


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 over the captions, in order."""
    return json_digest(list(texts))


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
        return json_digest(parts)[:32]

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

    def encode() -> ImageEmbeddings:
        return encode_image_files(
            model,
            paths,
            project=project,
            batch_size=batch_size,
            precision=precision,
            workers=workers,
            progress=progress,
        )

    if cache is None:
        return encode()
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
    result = encode()
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
