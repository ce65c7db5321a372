"""Digests that name what a cached or indexed vector was computed from: the model, its weights, the files.

Every on-disk cache (evaluation embeddings, the training feature cache, the search index) keys its entries on
these, so that a change to the weights, the preprocessing or a data file misses the cache instead of reusing
stale vectors. All are sha256 hex digests; none reads image contents (files are named by path, size and
modification time).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where weights are hashed: the cache keys of evaluation stay light
    import torch


def _add_weights(digest: Any, module: torch.nn.Module) -> None:
    """Feed every state-dict entry of ``module`` (name, dtype, shape, raw bytes), sorted by name, to ``digest``."""
    import torch

    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().tobytes())


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over ``module``'s weights and buffers; equal only for equal names, dtypes, shapes and values.

    Costs one pass over the weights (about 1 s per GB).
    """
    digest = hashlib.sha256()
    _add_weights(digest, module)
    return digest.hexdigest()


def model_identity(model: Any) -> str:
    """sha256 over a ClipModel's config (sorted JSON) and every weight tensor (see :func:`weights_digest`).

    Two models share it only when architecture, preprocessing and weights all match, so an index can refuse
    queries embedded by another model. Stored in index manifests: changing how it is computed orphans them.
    """
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    _add_weights(digest, model)
    return digest.hexdigest()


def files_digest(paths: Sequence[str | os.PathLike[str]]) -> str:
    """sha256 over each path, in order, with its size and modification time (a missing file hashes as missing)."""
    digest = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{os.fspath(p)}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 over ``obj`` as JSON with sorted keys (dataclasses and other objects through ``str``)."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()
