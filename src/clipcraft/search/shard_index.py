"""A search index built from embedding shards within a memory budget, and opened memory-mapped.

``build_index_from_shards(embeddings, out)`` reads the shards written by
:func:`clipcraft.search.embedding_shards.embed_to_shards` and writes an index directory::

    manifest.json       format clipcraft-index, layout "shards": model, precision, source, counts, index info,
                        metadata offsets
    index.faiss         exact (IndexFlatIP, small collections) or IVF with 8-bit scalar codes (``sq8``, D bytes a
                        vector), 8-bit product-quantizer codes (``pq``, D/2 bytes) or 4-bit product-quantizer
                        codes scanned with SIMD table lookups (``pq4fs``, FAISS "fast scan", D/4 bytes: about
                        10x faster to scan and to train than ``pq``), whose coarse quantizer is an HNSW graph
                        over the centroids
    vectors.npy         (N, D) the stored vectors (float16 or float32 as embedded), for the exact re-rank
    metadata/*.parquet  the shards' key, path and caption columns; row i of the index is row i - offset of
                        the shard holding it

The build never holds all the vectors: the coarse quantizer is trained on a sample (``train_per_list``
vectors per inverted list, read from the shards), then the vectors are added chunk by chunk as
``embedding-reader`` streams them from the ``.npy`` shards, and copied to ``vectors.npy`` on the way (plain
writes and reads: no memory map holds those pages in the build's resident memory). What stays in memory is
the IVF index (its codes, 8 bytes of id a vector, the lists' over-allocation as they grow and the allocator's
free blocks left behind) and one chunk. BENCHMARKS.md "Scaling out" has the measured peaks at 10M x 256-d.

Search: the IVF index finds ``k * refine_factor`` candidates on its codes; their stored vectors are
read from the memory-mapped ``vectors.npy`` and re-ranked exactly. ``nprobe`` (and, where the codes are too
coarse for it alone, ``refine_factor``) is tuned at build time until recall@10 against exact search
(leave-one-out, on sampled stored vectors) reaches ``target_recall``.
Opening memory-maps ``index.faiss`` (FAISS ``IO_FLAG_MMAP``), ``vectors.npy`` and each metadata shard as it
is first needed, so a large index opens in about the time it takes to read its manifest.

``autofaiss`` would choose the index and tune it in the same way, but it pins numpy<2 (this environment and
torch run numpy 2), so the build uses FAISS directly; ``embedding-reader`` does the chunked reading.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipcraft.data.folder import FileEntry
from clipcraft.errors import ClipcraftError
from clipcraft.files import atomic_dir, atomic_file
from clipcraft.search.ann import IndexConfig, drop_self, import_faiss, recall_at_k, resolve_kind
from clipcraft.search.embedding_shards import METADATA_DIR, read_manifest, shard_files
from clipcraft.search.index import FAISS_FILE, INDEX_FORMAT, MANIFEST, Index

LAYOUT = "shards"
LAYOUT_VERSION = 1
VECTORS = "vectors.npy"
ADD_EF_SEARCH = 16  # HNSW beam while adding: a vector near a list boundary may land in the next list
SEARCH_EF_SEARCH = 128  # HNSW beam at query time: finds the nprobe nearest lists
KNOBS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]


def _embedding_reader(folder: Path) -> Any:
    try:
        from embedding_reader import EmbeddingReader
    except ImportError:
        raise ClipcraftError(
            "Building an index from embedding shards needs embedding-reader: "
            "`pip install 'clipcraft[search]'` (or `pip install embedding-reader`)."
        ) from None
    return EmbeddingReader(str(folder), file_format="npy")


class _NpyRows:
    """Rows of a 2-D ``.npy`` file read with plain file reads (no memory map: the pages a build touches are
    not held in its resident memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(fh)
            self.offset = fh.tell()
        if fortran or len(shape) != 2:
            raise ClipcraftError(f"{path}: expected a C-ordered (N, D) array, got shape {shape}.")
        self.count, self.dim, self.dtype = int(shape[0]), int(shape[1]), np.dtype(dtype)
        self.row_bytes = self.dim * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> np.ndarray:
        """float32 rows [start, stop)."""
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * self.row_bytes)
            block = np.fromfile(fh, dtype=self.dtype, count=(stop - start) * self.dim)
        return block.reshape(-1, self.dim).astype(np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows at sorted indices ``rows``."""
        out = np.empty((len(rows), self.dim), np.float32)
        with open(self.path, "rb") as fh:
            for j, r in enumerate(rows):
                fh.seek(self.offset + int(r) * self.row_bytes)
                out[j] = np.frombuffer(fh.read(self.row_bytes), dtype=self.dtype)
        return out


def _sample_rows(files: list[tuple[Path, Path, int]], rows: np.ndarray) -> np.ndarray:
    """The float32 vectors at sorted global ``rows``, read from the shards."""
    out = []
    offsets = np.cumsum([0, *[count for _, _, count in files]])
    for s, (npy, _, count) in enumerate(files):
        mine = rows[(rows >= offsets[s]) & (rows < offsets[s] + count)] - offsets[s]
        if len(mine):
            out.append(_NpyRows(npy).take(mine))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def exact_topk(
    vectors: _NpyRows | np.ndarray, queries: np.ndarray, k: int, chunk: int = 50_000
) -> np.ndarray:
    """Ids (Q, k) of the exact top-k by inner product of (Q, D) float32 ``queries`` over the (N, D) rows of
    ``vectors`` (an array, or a ``.npy`` file read in chunks), ties by lower id."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    total = vectors.count if isinstance(vectors, _NpyRows) else vectors.shape[0]
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        if isinstance(vectors, _NpyRows):
            block = vectors.rows(start, stop)
        else:
            block = np.asarray(vectors[start:stop], dtype=np.float32)
        sims = queries @ block.T  # (Q, chunk)
        top = min(k, sims.shape[1])
        part = np.argpartition(-sims, top - 1, axis=1)[:, :top]  # this chunk's top-k, unordered
        s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], axis=1)
        i = np.concatenate([best_i, part + start], axis=1)
        order = _order(s, i)[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_i


def _order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row: positions sorted by score descending, ties by lower id."""
    return np.stack([np.lexsort((i, -s)) for s, i in zip(scores, ids, strict=True)])


def rerank(
    index: Any, vectors: np.ndarray | _NpyRows, queries: np.ndarray, k: int, refine: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of (Q, D) float32 ``queries``: ``k * refine`` candidates from the FAISS ``index``, re-scored
    exactly against the stored ``vectors`` (N, D): an array (memory-mapped when serving) or, while building,
    a ``.npy`` file read with plain reads. Returns scores and ids (Q, k), best first, ties by lower id;
    missing slots hold id -1 and score -inf."""
    _, cand = index.search(queries, k * refine)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for q, row in enumerate(cand):
        found = np.unique(row[row >= 0])  # sorted: memory-mapped reads in file order
        if not len(found):
            continue
        rows = vectors.take(found) if isinstance(vectors, _NpyRows) else vectors[found]
        sims = np.asarray(rows, dtype=np.float32) @ queries[q]
        order = np.lexsort((found, -sims))[:k]
        scores[q, : len(order)], ids[q, : len(order)] = sims[order], found[order]
    return scores, ids


def build_index_from_shards(
    embeddings: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: IndexConfig | None = None,
    *,
    chunk: int = 100_000,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the index directory ``out`` from the embedding shards in ``embeddings`` (see the module
    docstring) and return its manifest. Kinds: ``flat`` (exact; every vector in memory while building, so
    meant for small collections) and ``ivf``; ``auto`` picks flat below ``config.exact_threshold``. Raises
    :class:`ClipcraftError` for a folder without a finished manifest, or for ``hnsw`` (not built in chunks)."""
    faiss = import_faiss()
    start = time.perf_counter()
    config = config or IndexConfig()
    src = Path(embeddings)
    manifest = read_manifest(src)
    if manifest is None:
        raise ClipcraftError(f"{src} has no embedding-shards manifest.json: embed first (`clipcraft embed`).")
    files = shard_files(src, manifest)
    n, d = int(manifest["count"]), int(manifest["dim"])
    if n == 0:
        raise ClipcraftError(f"{src} holds no vectors: nothing to index.")
    kind = resolve_kind(config, n)
    if kind == "hnsw":
        raise ClipcraftError("An index built from embedding shards is flat or ivf (hnsw needs every vector).")
    rng = np.random.default_rng(config.seed)
    info: dict[str, Any] = {"kind": kind, "count": n, "dim": d}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = config.nlist or max(1, min(int(2 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        quantizer.hnsw.efSearch = ADD_EF_SEARCH  # assigning vectors to lists while adding
        if config.ivf_storage in ("pq", "pq4fs"):
            m = d // 2 if d % 2 == 0 else d  # 2 dims per sub-quantizer
            if config.ivf_storage == "pq":  # 8-bit codes: d/2 bytes a vector, half of sq8's
                index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
            else:  # 4-bit codes scanned with SIMD lookups ("fast scan"): d/4 bytes a vector
                index = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
        elif config.ivf_storage == "sq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            raise ClipcraftError(
                f"ivf_storage from shards must be 'sq8', 'pq' or 'pq4fs'; got {config.ivf_storage!r}."
            )
        index.clustering_index = faiss.IndexFlatIP(d)  # k-means assigns exactly (BLAS), not through the graph
        index.cp.niter = config.kmeans_iters
        index.cp.max_points_per_centroid = config.train_per_list
        train_rows = np.sort(rng.choice(n, min(n, config.train_per_list * nlist), replace=False))
        index.train(_sample_rows(files, train_rows))  # k-means on the sample; centroids into the HNSW
        info["train_s"] = round(time.perf_counter() - start, 2)
        _log_memory("trained")
        info.update(nlist=int(nlist), storage=config.ivf_storage, refine_factor=int(config.refine_factor))

    reader = _embedding_reader(src / "embeddings")
    dtype = np.dtype(manifest["dtype"])
    with atomic_dir(out) as tmp:
        row = 0
        with open(tmp / VECTORS, "wb") as stored:  # plain writes: the copy does not sit in resident memory
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, d)}
            np.lib.format.write_array_header_2_0(stored, header)
            # embedding-reader streams the shards in order; a small RAM budget keeps its read-ahead small
            for batch, _ in reader(batch_size=chunk, show_progress=progress, max_ram_usage_in_bytes=2**28):
                batch = np.ascontiguousarray(batch, dtype=np.float32)
                index.add(batch)
                stored.write(batch.astype(dtype).tobytes())
                row += len(batch)
        if row != n:
            raise ClipcraftError(f"{src}: read {row} vectors, the manifest says {n}.")
        info["add_s"] = round(time.perf_counter() - start - info.get("train_s", 0.0), 2)
        _log_memory("added")
        if kind == "ivf":
            faiss.downcast_index(index.quantizer).hnsw.efSearch = SEARCH_EF_SEARCH
            info.update(_tune(index, tmp / VECTORS, config, rng))
            info["quantizer_ef_search"] = SEARCH_EF_SEARCH
            info["tune_s"] = round(time.perf_counter() - start - info["train_s"] - info["add_s"], 2)
            _log_memory("tuned")
        (tmp / METADATA_DIR).mkdir()
        for _, parquet, _ in files:
            shutil.copyfile(parquet, tmp / METADATA_DIR / parquet.name)
        faiss.write_index(index, str(tmp / FAISS_FILE))
        out_manifest = {
            "format": INDEX_FORMAT,
            "format_version": 1,
            "layout": LAYOUT,
            "layout_version": LAYOUT_VERSION,
            "model_identity": manifest["model_identity"],
            "precision": manifest["precision"],
            "model_dir": manifest.get("model_dir"),
            "model_config": manifest.get("model_config"),
            "embed_dim": d,
            "dtype": manifest["dtype"],
            "source": manifest["source"],
            "source_kind": manifest["kind"],
            "root": manifest["source"] if manifest["kind"] == "folder" else "",
            "count": n,
            "index": info,
            "index_config": config.to_dict(),
            "metadata": [{"file": p.name, "count": c} for _, p, c in files],
            "embeddings": str(src.resolve()),
            "build": {
                "seconds": round(time.perf_counter() - start, 2),
                "failed_count": manifest["failed_count"],
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(out_manifest, indent=1) + "\n")
    return out_manifest


def _log_memory(phase: str) -> None:
    """With CLIPCRAFT_LOG_MEMORY=1, print the resident and peak memory after a build phase (benchmarks)."""
    if os.environ.get("CLIPCRAFT_LOG_MEMORY") != "1":
        return
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    print(f"[build] {phase}: VmRSS {status['VmRSS'].strip()}, VmHWM {status['VmHWM'].strip()}", flush=True)


REFINE_STEPS = (1, 1.5, 2, 3, 4, 6, 8)  # tuning tries refine_factor times these
# Modelled cost of one single-threaded query, to choose between (nprobe, refine) pairs that reach the target:
# nanoseconds per code scanned, by storage, and per candidate re-ranked (a stored row read and a dot product).
# Measured on a 10M x 256-d index on a 2-core AMD EPYC (bench/bench_scale.py); only their ratios matter.
SCAN_NS = {"sq8": 30.0, "pq": 100.0, "pq4fs": 10.0}
RERANK_NS = 2500.0


def _tune(index: Any, path: Path, config: IndexConfig, rng: np.random.Generator) -> dict[str, Any]:
    """The ``(nprobe, refine_factor)`` of least modelled query cost whose recall@10 (leave-one-out on sampled
    stored vectors, against exact search over all of them) reaches ``config.target_recall``: for each
    re-rank depth (``config.refine_factor`` times :data:`REFINE_STEPS`) the smallest ``nprobe`` that reaches
    it, costed as codes scanned (``nprobe`` x the mean list length x :data:`SCAN_NS`) plus candidates
    re-ranked (x :data:`RERANK_NS`). Coarse codes such as ``pq4fs`` rank true neighbours lower, and re-ranking
    a few more of them can be cheaper than scanning more lists. ``config.nprobe``, when given, is used with
    ``config.refine_factor`` as they are. Deterministic for a seed: no timing is involved."""
    faiss = import_faiss()
    ivf = faiss.extract_index_ivf(index)
    rows = _NpyRows(path)
    n = rows.count
    picked = np.sort(rng.choice(n, min(n, 200), replace=False))
    queries = rows.take(picked)
    k = min(10, n - 1)
    if k < 1:
        ivf.nprobe = ivf.nlist
        return {"nprobe": int(ivf.nlist), "tuned_recall_at_10": 1.0}
    truth = drop_self(exact_topk(rows, queries, k + 1), picked, k)

    def recall_of(nprobe: int, refine: int) -> float:
        ivf.nprobe = int(nprobe)
        # plain reads: a memory map would fault whole pages around every candidate into the build's
        # resident memory, which over the tuning's many candidates reaches the size of vectors.npy
        _, found = rerank(index, rows, queries, k + 1, refine)
        return recall_at_k(drop_self(found, picked, k), truth)

    if config.nprobe:
        chosen = (int(config.nprobe), int(config.refine_factor))
        recall = recall_of(*chosen)
    else:
        probes = [v for v in KNOBS if v < ivf.nlist] + [ivf.nlist]
        refines = sorted({max(1, round(config.refine_factor * step)) for step in REFINE_STEPS})
        scan_ns = SCAN_NS.get(config.ivf_storage, SCAN_NS["sq8"]) * n / ivf.nlist

        def cost(nprobe: int, refine: int) -> float:
            return nprobe * scan_ns + 10 * refine * RERANK_NS

        best: tuple[float, int, int, float] | None = None  # (cost, nprobe, refine, recall)
        fallback = (probes[-1], refines[-1], 0.0)
        for refine in refines:
            for value in probes:
                if best is not None and cost(value, refine) >= best[0]:
                    break  # deeper lists at this depth cannot be cheaper than the pair already found
                recall = recall_of(value, refine)
                if recall >= config.target_recall:
                    best = (cost(value, refine), value, refine, recall)
                    break
                if value == probes[-1] and recall > fallback[2]:
                    fallback = (value, refine, recall)
        chosen, recall = (best[1:3], best[3]) if best else (fallback[:2], fallback[2])
    ivf.nprobe = int(chosen[0])
    return {"nprobe": int(chosen[0]), "refine_factor": int(chosen[1]), "tuned_recall_at_10": round(recall, 4)}


def retune_index(path: str | os.PathLike[str], target_recall: float, *, seed: int = 0) -> dict[str, Any]:
    """Tune a built shard index directory again for ``target_recall`` (``nprobe`` and ``refine_factor``, as
    the build does) without rebuilding it, and rewrite its manifest. Returns the manifest's new ``index``."""
    root = Path(path)
    manifest = json.loads((root / MANIFEST).read_text())
    info = manifest.get("index", {})
    if manifest.get("layout") != LAYOUT or info.get("kind") != "ivf":
        raise ClipcraftError(f"{root} is not an IVF index built from embedding shards: nothing to tune.")
    index = load_shard_index(root, manifest).faiss_index  # as searches open it
    known = {f.name for f in dataclasses.fields(IndexConfig)}
    saved = {k: v for k, v in manifest.get("index_config", {}).items() if k in known}
    config = IndexConfig(**{**saved, "target_recall": target_recall, "nprobe": None})
    start = time.perf_counter()
    info.update(_tune(index, root / VECTORS, config, np.random.default_rng(seed)))
    info["tune_s"] = round(time.perf_counter() - start, 2)
    manifest["index"], manifest["index_config"] = info, config.to_dict()
    with atomic_file(root / MANIFEST) as fh:
        fh.write((json.dumps(manifest, indent=1) + "\n").encode())
    return info


class _Rows:
    """``files`` of a shard-built index, read lazily from the metadata parquet shards: row i ->
    :class:`FileEntry` (path = the key: the relative path for folders; size and mtime 0: not recorded)."""

    def __init__(self, index: ShardIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return self.index.count

    def __getitem__(self, row: int) -> FileEntry:
        return FileEntry(str(self.index.metadata(int(row))["key"]), 0, 0)

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))


class ShardIndex(Index):
    """An index built by :func:`build_index_from_shards`, opened memory-mapped (use :meth:`Index.load`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], faiss_index: Any, model: Any = None) -> None:
        self.count = int(manifest["count"])
        vectors = np.load(path / VECTORS, mmap_mode="r")  # (N, D) float16/float32 on disk
        super().__init__(path, manifest, [], vectors, faiss_index, [], np.zeros((0, vectors.shape[1])), model)
        self.files = _Rows(self)  # type: ignore[assignment]
        counts = [int(m["count"]) for m in manifest["metadata"]]
        self._offsets = np.cumsum([0, *counts])
        self._meta_files = [path / METADATA_DIR / m["file"] for m in manifest["metadata"]]
        self._refine = int(manifest["index"].get("refine_factor", 1))

    def __len__(self) -> int:
        return self.count

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one index per process; a handful of shards stay open)
    def _table(self, shard: int) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(self._meta_files[shard], memory_map=True)

    def metadata(self, row: int) -> dict[str, Any]:
        """Key, path and caption of index row ``row``."""
        if not 0 <= row < self.count:
            raise IndexError(row)
        shard = int(np.searchsorted(self._offsets, row, side="right")) - 1
        table = self._table(shard)
        i = row - int(self._offsets[shard])
        return {name: table.column(name)[i].as_py() for name in ("key", "path", "caption")}

    def path_of(self, row: int) -> str:
        meta = self.metadata(row)
        if self.manifest.get("source_kind") == "webdataset":
            return f"{meta['path']}:{meta['key']}"
        return str(meta["path"])

    @property
    def paths(self) -> list[str]:
        return [self.path_of(i) for i in range(self.count)]

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`Index.search_vectors`; IVF candidates are re-ranked exactly on the stored vectors."""
        if k < 1:
            raise ClipcraftError(f"k must be >= 1, got {k}.")
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.embeddings.shape[1]:
            raise ClipcraftError(f"Queries must be (Q, {self.embeddings.shape[1]}); got {q.shape}.")
        k = min(k, self.count)
        if self.manifest["index"]["kind"] == "flat":
            return self.faiss_index.search(q, k)
        return rerank(self.faiss_index, self.embeddings, q, k, self._refine)


def load_shard_index(path: Path, manifest: dict[str, Any]) -> ShardIndex:
    """Open a shard-built index directory memory-mapped (FAISS lists, vectors and metadata)."""
    faiss = import_faiss()
    if int(manifest.get("layout_version", 0)) > LAYOUT_VERSION:
        raise ClipcraftError(f"{path} was written by a newer clipcraft; upgrade clipcraft to read it.")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    index = faiss.read_index(str(path / FAISS_FILE), flags)
    info = manifest.get("index", {})
    if info.get("kind") == "ivf":
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = int(info["nprobe"])
        faiss.downcast_index(ivf.quantizer).hnsw.efSearch = int(
            info.get("quantizer_ef_search", SEARCH_EF_SEARCH)
        )
    if index.ntotal != int(manifest["count"]):
        raise ClipcraftError(
            f"{path} is inconsistent: {index.ntotal} indexed vectors, {manifest['count']} in the manifest."
        )
    return ShardIndex(path, manifest, index)
