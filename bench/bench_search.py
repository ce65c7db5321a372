"""Search benchmarks: nearest-neighbour indexes, embedding throughput of `index build`, web API under load.

Prints tables and writes bench/results/search.json (or search-quick.json with --quick). Sections:

* ann: build time, index memory, single-query latency p50/p99 and recall@10 against exact search, for the
  model's own embeddings of the Flickr8k images and for synthetic sets made like them (unit vectors from a
  mixture of many clusters in a low-dimensional subspace) of 10k, 100k and 1M vectors, 512-d.
* embed: images/s of the index build's embedding loop with the seed architecture (random weights) against
  open_clip's ``encode_image`` on the same timm trunk, same batch, same run (contenders interleaved in
  rounds); the same loop without the class-token shortcut; and the loader alone.
* load: 8 clients calling the web API for 30 s on localhost (text searches and image uploads mixed) over an
  index of 10,000 images (Flickr8k's 8,091 plus generated ones); a cached thumbnail's latency; the page's
  first load (bytes, requests).

Usage:
    .venv/bin/python bench/bench_search.py            # everything (about 15 minutes on 2 CPU cores)
    .venv/bin/python bench/bench_search.py --quick    # small sizes, a few seconds per section
    .venv/bin/python bench/bench_search.py --only ann --sizes 1000000
    .venv/bin/python bench/bench_search.py --only embed --out bench/results/search-embed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k" / "images"
RESULTS = ROOT / "bench" / "results"


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, q))


# ----------------------------------------------------------------------------------------------------------
# Data


def synthetic(
    n: int, d: int = 512, subspace: int = 64, clusters: int | None = None, seed: int = 0
) -> np.ndarray:
    """Unit float32 vectors from a mixture of many clusters in a random ``subspace``-dim subspace of R^d.

    Cluster sizes vary (Zipf-like weights) and each cluster has its own spread, so neighbourhoods are uneven
    as in real embeddings; a small isotropic component keeps every vector full-rank.
    """
    rng = np.random.default_rng(seed)
    clusters = clusters or max(10, n // 200)
    basis = np.linalg.qr(rng.normal(size=(d, subspace)))[0].T.astype(np.float32)  # (S, D)
    centers = rng.normal(size=(clusters, subspace)).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    spread = rng.uniform(0.25, 0.6, clusters).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    step = 200_000
    for start in range(0, n, step):
        m = min(step, n - start)
        c = rng.choice(clusters, m, p=weights / weights.sum())
        z = centers[c] + spread[c, None] * rng.normal(size=(m, subspace)).astype(np.float32)
        x = z @ basis + 0.03 * rng.normal(size=(m, d)).astype(np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def flickr_embeddings(limit: int | None, workers: int) -> np.ndarray:
    """The tiny preset (random weights, 512-d head) embedding the Flickr8k images through the index builder."""
    import torch

    from clipcraft import create_model
    from clipcraft.data.folder import scan_images
    from clipcraft.encoding import EncodeSettings, encode_images

    torch.manual_seed(0)
    model = create_model("tiny", overrides={"embed_dim": 512}).eval()
    paths = [str(FLICKR / e.path) for e in scan_images(FLICKR)][:limit]
    return encode_images(model, paths, EncodeSettings(batch_size=256, workers=workers)).vectors


# ----------------------------------------------------------------------------------------------------------
# ANN


def bench_ann(
    name: str, data: np.ndarray, kinds: list[str], n_queries: int, n_latency: int
) -> list[dict[str, Any]]:
    """Index ``data`` minus held-out queries with each kind; recall@10 against exact search on the same set."""
    import faiss

    from clipcraft.search.ann import IndexConfig, build_faiss

    rng = np.random.default_rng(1)
    held = rng.choice(data.shape[0], n_queries, replace=False)
    mask = np.ones(data.shape[0], bool)
    mask[held] = False
    queries, x = data[held], np.ascontiguousarray(data[mask])
    rows = []
    truth = None
    for kind in kinds:
        t0 = time.perf_counter()
        index, info = build_faiss(x, IndexConfig(kind=kind))
        build_s = time.perf_counter() - t0
        memory = int(faiss.serialize_index(index).nbytes)
        if truth is None:  # exact answers, batched
            flat = faiss.IndexFlatIP(x.shape[1])
            flat.add(x)
            _, truth = flat.search(queries, 10)
            del flat
        _, found = index.search(queries, 10)
        from clipcraft.search.ann import recall_at_k

        recall = recall_at_k(found, truth)
        # Single queries run on one FAISS thread: OpenMP start-up costs more than it saves for one query,
        # and a server handles concurrent queries on the other cores.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        lat = []
        for q in queries[:n_latency]:
            t = time.perf_counter()
            index.search(q[None, :], 10)
            lat.append(time.perf_counter() - t)
        faiss.omp_set_num_threads(threads)
        row = {
            "dataset": name,
            "n": int(x.shape[0]),
            "dim": int(x.shape[1]),
            "kind": info["kind"],
            "params": {k: v for k, v in info.items() if k in ("nlist", "nprobe", "M", "ef_search")},
            "build_s": round(build_s, 2),
            "index_mb": round(memory / 2**20, 1),
            "p50_ms": round(percentile_ms(lat, 50), 3),
            "p99_ms": round(percentile_ms(lat, 99), 3),
            "recall_at_10": round(recall, 4),
            "queries": int(len(queries)),
            "latency_queries": len(lat),
            "faiss_threads_single_query": 1,
        }
        print(
            f"{name:>16} {row['n']:>8} {row['kind']:>5} {json.dumps(row['params']):<28} build {build_s:7.2f} s  "
            f"{row['index_mb']:8.1f} MB  p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms  "
            f"recall@10 {recall:.4f}",
            flush=True,
        )
        rows.append(row)
        del index
    return rows


# ----------------------------------------------------------------------------------------------------------
# Embedding throughput


def bench_embed(
    n_images: int, batch_size: int, workers: int, rounds: int, precision_word: str = "fp32"
) -> dict[str, Any]:
    """Seed architecture, random weights: the index build's embedding loop against open_clip's encode_image,
    both in the same precision (``precision_word`` resolved once; open_clip under the same bf16 autocast).

    Three contenders run one after the other in each of ``rounds`` rounds, so background load hits them alike:
    ``index build`` (:func:`clipcraft.encoding.iter_images` as ``index build`` calls it: loader
    workers + model, the class-token shortcut on where the tower allows it), the same loop with the shortcut
    off, and open_clip's ``encode_image`` on the same preprocessed batches (decoding not timed). Each pass
    times every batch after its first; rates are ``batch_size / median batch time`` over all rounds. The
    loader alone (the same loader, no model) shows whether decoding could be the bottleneck.
    """
    import open_clip
    import torch

    from clipcraft import create_model
    from clipcraft.data.folder import scan_images
    from clipcraft.encoding import EncodeSettings, image_loader, iter_images, shortcut_unavailable
    from clipcraft.precision import autocast, resolve_precision

    paths = [str(FLICKR / e.path) for e in scan_images(FLICKR)][:n_images]
    torch.manual_seed(0)
    model = create_model("seed", pretrained=False).eval()
    precision = resolve_precision(precision_word, model.device)
    transform = model.image_transform(train=False)
    oc = open_clip.CLIP(**OPEN_CLIP_SEED).eval()
    batches = [
        torch.stack([transform(_load(p)) for p in paths[i : i + batch_size]])
        for i in range(0, len(paths), batch_size)
    ]

    def batch_times(stream: Any) -> tuple[list[float], list[np.ndarray]]:
        """Seconds per item of ``stream`` after the first (which carries worker start-up), and the items."""
        items, stamps = [], [time.perf_counter()]
        for item in stream:
            items.append(item)
            stamps.append(time.perf_counter())
        return list(np.diff(stamps)[1:]), items

    def open_clip_batches() -> Any:
        with torch.inference_mode(), autocast("cpu", precision):
            for b in batches:
                yield oc.encode_image(b, normalize=True)

    times: dict[str, list[float]] = {"loader": [], "index_build": [], "shortcut_off": [], "open_clip": []}
    vectors: dict[str, np.ndarray] = {}
    load = [os.getloadavg()[0]]
    loader_times, _ = batch_times(image_loader(paths, transform, batch_size=batch_size, workers=workers))
    times["loader"] += loader_times
    for r in range(rounds):
        for name, shortcut in (("index_build", None), ("shortcut_off", False)):
            settings = EncodeSettings(
                precision=precision, batch_size=batch_size, workers=workers, shortcut=shortcut
            )
            t, items = batch_times(iter_images(model, paths, settings))
            times[name] += t
            vectors[name] = np.concatenate([b.vectors for b in items])
        times["open_clip"] += batch_times(open_clip_batches())[0]
        load.append(os.getloadavg()[0])
        rates = {k: batch_size / float(np.median(v)) for k, v in times.items() if k != "loader"}
        print(
            f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v:.2f} img/s" for k, v in rates.items()),
            flush=True,
        )

    def rate(name: str) -> float:
        return batch_size / float(np.median(times[name]))

    a, b = vectors["index_build"], vectors["shortcut_off"]
    result = {
        "images": len(paths),
        "batch_size": batch_size,
        "workers": workers,
        "rounds": rounds,
        "timed_batches_per_contender": len(times["open_clip"]),
        "precision": f"{precision} (clipcraft and open_clip alike)",
        "torch_threads": torch.get_num_threads(),
        "class_token_shortcut": shortcut_unavailable(model) or "on",
        "load_average_1min": [round(x, 2) for x in load],
        "loader_only_images_per_s": round(rate("loader"), 2),
        "index_build_images_per_s": round(rate("index_build"), 3),
        "index_build_shortcut_off_images_per_s": round(rate("shortcut_off"), 3),
        "open_clip_encode_image_images_per_s": round(rate("open_clip"), 3),
        "speedup": round(rate("index_build") / rate("open_clip"), 3),
        "speedup_shortcut_off": round(rate("shortcut_off") / rate("open_clip"), 3),
        "shortcut_min_cosine_to_full": round(float(((a * b).sum(1)).min()), 6),
        "seconds_per_batch": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "seconds_per_batch"}, indent=1), flush=True)
    return result


# open_clip's CLIP on the seed's image trunk: timm vit_base_patch16_224 (class-token pooling), random weights,
# a linear projection to 512-d; a one-layer text tower (never run here).
OPEN_CLIP_SEED = {
    "embed_dim": 512,
    "vision_cfg": {
        "timm_model_name": "vit_base_patch16_224",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 224,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 1},
}


def _load(path: str) -> Any:
    from clipcraft.images import load_image

    return load_image(path)


# ----------------------------------------------------------------------------------------------------------
# Web API under load


def _fill_with_generated(images: Path, count: int, seed: int = 0) -> None:
    """``count`` small generated JPEGs (noise over a colour field), so an index reaches the benchmark's size
    when Flickr8k has fewer images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        base = rng.integers(0, 255, 3, dtype=np.uint8)
        pixels = np.clip(base + rng.normal(0, 40, (96, 128, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"generated-{i:05d}.jpg", quality=80)


def bench_load(seconds: float, clients: int, n_images: int, upload_every: int = 4) -> dict[str, Any]:
    """``clients`` threads call the web API for ``seconds`` (bounded loops): text searches, and every
    ``upload_every``-th request an image upload (an indexed Flickr8k photo) searched by image. Then the
    thumbnail route for a cached thumbnail, and the page's first load (bytes and requests)."""
    import httpx
    import torch
    import uvicorn

    from clipcraft import create_model
    from clipcraft.search.index import build_index
    from clipcraft.server.app import create_app

    work = Path(tempfile.mkdtemp(prefix="clipcraft-bench-"))
    try:
        images = work / "images"
        images.mkdir()
        flickr = sorted(os.listdir(FLICKR))[:n_images]
        for e in flickr:  # copies, not links: the server refuses links that lead outside the indexed folder
            try:
                os.link(FLICKR / e, images / e)
            except OSError:
                shutil.copyfile(FLICKR / e, images / e)
        _fill_with_generated(images, n_images - len(flickr))
        torch.manual_seed(0)
        create_model("tiny").save(work / "model")
        t = time.perf_counter()
        report = build_index(work / "model", images, work / "index", workers=1)
        print(f"indexed {report.total} images in {time.perf_counter() - t:.0f} s", flush=True)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(create_app(work / "index"), host="127.0.0.1", port=port, log_level="error")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        words = ["dog", "a child playing", "two people on a beach", "a red car", "mountain", "a man in a hat"]
        uploads = [(FLICKR / name).read_bytes() for name in flickr[:20]]
        latencies: dict[str, list[float]] = {"text": [], "image": []}
        errors: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def client(i: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                j = 0
                while time.monotonic() < deadline:
                    kind = "image" if (i + j) % upload_every == 0 else "text"
                    t = time.perf_counter()
                    if kind == "text":
                        r = c.get("/api/search/text", params={"q": words[(i + j) % len(words)], "k": 24})
                    else:
                        data = uploads[(i + j) % len(uploads)]
                        r = c.post(
                            "/api/search/image",
                            files={"file": ("q.jpg", data, "image/jpeg")},
                            data={"k": "24"},
                        )
                    elapsed = time.perf_counter() - t
                    with lock:
                        latencies[kind].append(elapsed)
                        if r.status_code != 200 or len(r.json()["results"]) != 24:
                            errors.append(f"{kind} {r.status_code} {r.text[:80]}")
                    j += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        every = latencies["text"] + latencies["image"]

        # thumbnails: made once (cold), then served from the cache (warm); one client, sequential
        with httpx.Client(base_url=base, timeout=30) as c:
            rows = c.get("/api/search/text", params={"q": "a dog", "k": 50}).json()["results"]
            cold, warm = [], []
            for r in rows:
                t = time.perf_counter()
                ok = c.get(r["thumb"]).status_code == 200
                cold.append(time.perf_counter() - t)
                errors += [] if ok else [f"thumb {r['thumb']}: {c.get(r['thumb']).text[:100]}"]
            for _ in range(4):
                for r in rows:
                    t = time.perf_counter()
                    c.get(r["thumb"])
                    warm.append(time.perf_counter() - t)
            # the page's first load: the HTML, what it links, and the info call its script makes
            page = c.get("/")
            first_load = [("/", len(page.content))]
            for url in ("/static/app.css", "/static/app.js", "/api/info"):
                first_load.append((url, len(c.get(url).content)))
        server.should_exit = True
        thread.join(timeout=10)
        result = {
            "clients": clients,
            "seconds": round(wall, 1),
            "index_images": report.total,
            "index_flickr8k_images": len(flickr),
            "requests": len(every),
            "throughput_per_s": round(len(every) / wall, 1),
            "p50_ms": round(percentile_ms(every, 50), 1),
            "p99_ms": round(percentile_ms(every, 99), 1),
            "text": {
                "requests": len(latencies["text"]),
                "p50_ms": round(percentile_ms(latencies["text"], 50), 1),
                "p99_ms": round(percentile_ms(latencies["text"], 99), 1),
            },
            "image": {
                "requests": len(latencies["image"]),
                "p50_ms": round(percentile_ms(latencies["image"], 50), 1),
                "p99_ms": round(percentile_ms(latencies["image"], 99), 1),
            },
            "errors": len(errors),
            "error_examples": sorted(set(errors))[:5],
            "thumbnail_cold_p50_ms": round(percentile_ms(cold, 50), 2),
            "thumbnail_cached_p50_ms": round(percentile_ms(warm, 50), 2),
            "thumbnail_cached_p99_ms": round(percentile_ms(warm, 99), 2),
            "first_load_requests": len(first_load),
            "first_load_bytes": sum(n for _, n in first_load),
            "first_load": dict(first_load),
            "load_average_1min_after": round(os.getloadavg()[0], 2),
            "note": (
                f"one request = one API call, k=24: text search, or (every {upload_every}th) an image upload "
                "searched by image; tiny preset model"
            ),
        }
        print(json.dumps(result, indent=1), flush=True)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and short runs (smoke test)")
    parser.add_argument("--only", choices=["ann", "embed", "load"], action="append", help="run some sections")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="synthetic set sizes")
    parser.add_argument("--workers", type=int, default=1, help="loader processes")
    parser.add_argument("--embed-images", type=int, default=32, help="images per embedding pass")
    parser.add_argument("--embed-batch", type=int, default=8, help="batch size of the embedding section")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the embedding contenders")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default="fp32",
        help="both contenders of the embed section",
    )
    parser.add_argument(
        "--load-images",
        type=int,
        default=10_000,
        help="index size of the load section (Flickr8k + generated)",
    )
    parser.add_argument("--note", default="", help="free text stored with the embedding figures")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/search[-quick].json)")
    args = parser.parse_args(argv)
    sections = args.only or ["ann", "embed", "load"]
    sizes = args.sizes or ([10_000] if args.quick else [10_000, 100_000, 1_000_000])
    results: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "quick": args.quick,
    }
    try:
        import faiss
        import torch

        results["machine"] |= {"torch": torch.__version__, "faiss": faiss.__version__}
    except ImportError:
        pass
    out = Path(args.out) if args.out else RESULTS / ("search-quick.json" if args.quick else "search.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section, so a late failure keeps the earlier figures
        out.write_text(json.dumps(results, indent=1) + "\n")

    if "ann" in sections:
        print("== nearest-neighbour search (single queries, k=10) ==", flush=True)
        rows: list[dict[str, Any]] = []
        if FLICKR.is_dir():
            t = time.perf_counter()
            real = flickr_embeddings(1000 if args.quick else None, args.workers)
            print(f"embedded {len(real)} Flickr8k images in {time.perf_counter() - t:.1f} s", flush=True)
            rows += bench_ann("flickr8k-tiny512", real, ["flat", "ivf", "hnsw"], 200, 200)
        else:
            print(f"(skipping real embeddings: {FLICKR} not found)")
        for n in sizes:
            n_queries = 1000 if n < 1_000_000 else 300  # held out of the index, used as queries
            data = synthetic(n + n_queries)
            kinds = ["flat", "ivf"] + (["hnsw"] if n <= 100_000 else [])  # HNSW at 1M takes >10 min here
            rows += bench_ann("synthetic", data, kinds, n_queries, n_queries)
            del data
        results["ann"] = rows
        save()
    if "embed" in sections:
        print("== embedding throughput (seed architecture, random weights) ==", flush=True)
        if FLICKR.is_dir():
            n = 16 if args.quick else args.embed_images
            results["embed"] = bench_embed(
                n, args.embed_batch, args.workers, 1 if args.quick else args.rounds, args.precision
            )
            if args.note:
                results["embed"]["note"] = args.note
            save()
    if "load" in sections:
        print("== web API under load ==", flush=True)
        if FLICKR.is_dir():
            results["load"] = bench_load(5 if args.quick else 30, 8, 200 if args.quick else args.load_images)
            save()
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
