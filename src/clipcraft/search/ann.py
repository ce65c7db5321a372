"""Nearest-neighbour indexes over unit vectors: exact inner product, IVF or HNSW (FAISS), and the numpy
reference they are tested against.

Scores are inner products of unit vectors, i.e. cosine similarities in [-1, 1], higher = closer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clipcraft.errors import ClipcraftError

KINDS = ("auto", "flat", "ivf", "hnsw")


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ClipcraftError(
            "Search indexes need FAISS, which is not installed. Run `pip install 'clipcraft[search]'` "
            "(or `pip install faiss-cpu`)."
        ) from None
    return faiss


@dataclass
class IndexConfig:
    """How the vectors are indexed. ``auto`` picks exact search below ``exact_threshold`` vectors, IVF above."""

    kind: str = "auto"  # auto | flat (exact) | ivf (approximate, inverted lists) | hnsw (approximate, graph)
    exact_threshold: int = 50_000  # auto: exact inner-product search below this many vectors
    target_recall: float = 0.98  # approximate: search effort is tuned until recall@10 vs exact reaches this
    nlist: int | None = None  # ivf: inverted lists; None = about sqrt(N)
    nprobe: int | None = None  # ivf: lists visited per query; None = tuned at build time
    hnsw_m: int = 32  # hnsw: links per node
    ef_construction: int = 64  # hnsw: build-time beam width
    ef_search: int | None = None  # hnsw: search beam width; None = tuned at build time
    ivf_storage: str = "sq8"  # ivf: flat (float32 lists) | sq8 (8-bit codes, 4x less to scan, exact re-rank);
    # built from embedding shards also pq (8-bit PQ, D/2 bytes) | pq4fs (4-bit PQ fast scan, D/4 bytes)
    refine_factor: int = 4  # ivf sq8: re-rank k * this many candidates with the exact vectors
    train_per_list: int = 64  # ivf: training vectors sampled per list for the coarse quantizer (k-means)
    kmeans_iters: int = 10  # ivf: k-means iterations (quality saturates early on embeddings)
    seed: int = 0  # sampling for training and tuning

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_kind(config: IndexConfig, n: int) -> str:
    if config.kind not in KINDS:
        raise ClipcraftError(f"index kind must be one of {', '.join(KINDS)}; got {config.kind!r}.")
    if config.kind != "auto":
        return config.kind
    return "flat" if n < config.exact_threshold else "ivf"


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy top-k by inner product: (Q, D) queries over (N, D) vectors -> scores, ids (Q, k').

    k' = min(k, N); rows sorted by score descending, ties by lower id. The reference for the FAISS paths.
    """
    k = min(k, vectors.shape[0])
    sims = queries.astype(np.float32) @ vectors.astype(np.float32).T  # (Q, N)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids.astype(np.int64)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (Q, k) ids found in the same row of ``found`` (Q, k)."""
    hits = [
        len(set(f.tolist()) & set(t.tolist())) / max(1, len(t)) for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0


def build_faiss(vectors: np.ndarray, config: IndexConfig) -> tuple[Any, dict[str, Any]]:
    """Build a FAISS inner-product index over (N, D) float32 unit vectors.

    Returns the index and what was chosen (``kind``, ``nlist``/``nprobe`` or ``M``/``ef_search``, the
    recall@10 measured against exact search on a sample of the vectors used as queries).
    """
    faiss = import_faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    kind = resolve_kind(config, n)
    info: dict[str, Any] = {"kind": kind, "count": int(n), "dim": int(d)}
    if kind == "flat" or n == 0:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        info["kind"] = "flat"
        return index, info
    rng = np.random.default_rng(config.seed)
    if kind == "ivf":
        nlist = config.nlist or max(1, min(int(math.sqrt(n)), n // 39))
        if config.ivf_storage not in ("flat", "sq8"):
            raise ClipcraftError(f"ivf_storage must be 'flat' or 'sq8'; got {config.ivf_storage!r}.")
        quantizer = faiss.IndexFlatIP(d)
        if config.ivf_storage == "sq8":
            ivf = faiss.IndexIVFScalarQuantizer(
                quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = config.kmeans_iters
        ivf.cp.max_points_per_centroid = config.train_per_list
        train_size = config.train_per_list * nlist
        train = x if n <= train_size else x[np.sort(rng.choice(n, train_size, replace=False))]
        if config.ivf_storage == "sq8":
            # 8-bit codes find candidates; the exact float32 vectors re-rank them
            index = faiss.IndexRefineFlat(ivf)
            index.k_factor = float(config.refine_factor)
            info["refine_factor"] = int(config.refine_factor)
        else:
            index = ivf
        index.train(train)
        index.add(x)
        info["nlist"] = int(nlist)
        info["storage"] = config.ivf_storage
        knob, values = "nprobe", [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256]
        fixed = config.nprobe
        values = [v for v in values if v <= nlist] + ([nlist] if nlist not in values else [])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.add(x)
        info["M"] = int(config.hnsw_m)
        knob, values = "ef_search", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
        fixed = config.ef_search
    else:  # pragma: no cover - resolve_kind guards
        raise AssertionError(kind)

    def set_knob(value: int) -> None:
        if kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = int(value)
        else:
            index.hnsw.efSearch = int(value)

    # Tune the search effort leave-one-out: stored vectors are the queries and each one's own row is dropped
    # from both answers, so the queries are as far from their neighbours as new data would be (a query
    # that finds itself would make any index look good).
    picked = rng.choice(n, min(n, 300 if n <= 200_000 else 100), replace=False)
    queries = x[picked]
    k = min(10, n - 1)
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    _, truth = flat.search(queries, k + 1)
    del flat
    truth = drop_self(truth, picked, k)

    chosen, recall = values[-1], 0.0
    for value in [fixed] if fixed else values:
        set_knob(value)
        _, found = index.search(queries, k + 1)
        chosen, recall = value, recall_at_k(drop_self(found, picked, k), truth)
        if recall >= config.target_recall:
            break
    set_knob(chosen)
    info[knob] = int(chosen)
    info["tuned_recall_at_10"] = round(recall, 4)
    return index, info


def drop_self(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Remove each row's own id from (Q, k+1) neighbour ids and keep the first k (id -1 pads)."""
    out = np.full((ids.shape[0], k), -1, dtype=np.int64)
    for r, (row, me) in enumerate(zip(ids, own, strict=True)):
        rest = row[row != me][:k]
        out[r, : len(rest)] = rest
    return out


def set_search_params(index: Any, info: dict[str, Any]) -> None:
    """Restore the tuned search effort after reading an index from disk (FAISS does not store it)."""
    if info.get("kind") == "ivf":
        import_faiss().extract_index_ivf(index).nprobe = int(info["nprobe"])
        if "refine_factor" in info:
            index.k_factor = float(info["refine_factor"])
    elif info.get("kind") == "hnsw":
        index.hnsw.efSearch = int(info["ef_search"])
