"""Scale-out benchmarks: streaming from WebDataset shards, training from shards, 2-process torchrun, and an index
built from embedding shards.

Sections (``--only NAME``), each printing a table and writing bench/results/scale-NAME.json:

* loader: samples/s delivered to the training step by the map-style loader (grouped sampler over the Flickr8k
  folder) and by the streaming loader (the same images converted to shards by `clipcraft data shards`), 1 and
  2 DataLoader workers, the recipe's transform (112 px, random resized crop, flip) and tokenizer; the two
  alternate in rounds, medians of the rounds.
* train: the Flickr8k recipe (configs/flickr8k-minilm-vit-tiny.yaml) as it stands: the locked MiniLM text
  tower's caption features cached once, and the recipe's ``captions_per_image`` (5) per image per step, for
  ``--epochs`` epochs, map-style and from shards (epoch order, ``train_num_samples`` = the 6,000 training
  images; the shards' cache is keyed by caption); validation recall on the dev split after each epoch. Both
  caches live in ``--work``/train-feature-cache: the first seed's runs build them (their minutes include it),
  later seeds and reruns read them.
* ddp: 2-process torchrun (gloo, deterministic stream) from shards against 1 process with the global batch:
  the losses of the first ``--steps`` steps.
* index: ``--n`` synthetic ``--dim``-d unit vectors (clustered in a low-dimensional subspace, like
  bench_search.py's, generated chunk by chunk) written as float16 embedding shards, then the index built from
  them in a child process (peak RSS = its ru_maxrss), its size on disk, the time to open it (a fresh
  process), single-query latency p50/p99 and recall@10 against exact search on 1,000 held-out queries.

Usage:
    .venv/bin/python bench/bench_scale.py --only loader
    .venv/bin/python bench/bench_scale.py --only train --epochs 3
    .venv/bin/python bench/bench_scale.py --only ddp --steps 8
    .venv/bin/python bench/bench_scale.py --only index --n 10000000 --work /tmp/scale-bench [--phase build|search]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
RECIPE = ROOT / "configs" / "flickr8k-minilm-vit-tiny.yaml"
RESULTS = ROOT / "bench" / "results"


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    flags = Path("/proc/cpuinfo").read_text()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "python": platform.python_version(),
    }


def write(name: str, data: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"scale-{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=1) + "\n")
    print(f"wrote {path}")


def flickr_shards(work: Path) -> Path:
    """Flickr8k's training split as shards of 1,000 (kept between runs: the writer skips finished shards)."""
    from clipcraft.data.shards import write_shards

    out = work / "f8k-train-shards"
    t = time.perf_counter()
    manifest = write_shards(FLICKR, out, samples_per_shard=1000, split="train")
    print(
        f"shards: {manifest.num_samples} samples in {len(manifest.shards)} shards ({time.perf_counter() - t:.1f} s)"
    )
    return out


def recipe(**overrides: Any) -> dict[str, Any]:
    import yaml

    config = yaml.safe_load(RECIPE.read_text())
    config.update({"data": str(FLICKR), "captions_per_image": 1, "example_sheet": False, **overrides})
    return config


# -- loader ------------------------------------------------------------------------------------------------


def bench_loader(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    from clipcraft.data import CaptionGroupedBatchSampler, open_dataset
    from clipcraft.data.webdataset import ShardBatches, StreamPlan, WebDatasetStream, in_order
    from clipcraft.model import create_model
    from clipcraft.train.loop import _EpochKeys, _StreamCollate, _TrainCollate, _TrainItems

    torch.set_num_threads(1)
    shards = flickr_shards(args.work)
    config = recipe()
    model = create_model(
        "minilm-vit-tiny",
        pretrained=False,
        overrides={"image.model_kwargs": config["model_overrides"]["image.model_kwargs"]},
    )
    transform = model.image_transform(train=True, scale=tuple(config["crop_scale"]), hflip=config["hflip"])
    batch, n_batches, warm = args.batch_size, args.batches, 2
    train_set = open_dataset(FLICKR, split="train")

    def map_loader(workers: int, epoch: int) -> Any:
        sampler = CaptionGroupedBatchSampler(train_set, batch, seed=0)
        sampler.set_epoch(epoch)
        items = _TrainItems(train_set, transform, seed=0)
        return DataLoader(
            items,
            batch_sampler=_EpochKeys(sampler),
            collate_fn=_TrainCollate(model.tokenize),
            num_workers=workers,
        )

    def stream_loader(workers: int, epoch: int) -> Any:
        stream = WebDatasetStream(
            str(shards), transform=transform, shuffle_buffer=1000, seed=0, rank=0, world_size=1
        )
        plan = StreamPlan(
            steps=6000 // batch, batch_size=batch, world_size=1, num_workers=workers, resampled=False, seed=0
        )
        batches = ShardBatches(stream, plan)
        batches.set_epoch(epoch)
        loader = DataLoader(
            batches, batch_size=None, collate_fn=_StreamCollate(model.tokenize), num_workers=workers
        )
        return in_order(iter(loader), 0)

    results: dict[str, Any] = {
        "batch_size": batch,
        "batches_timed": n_batches,
        "warmup_batches": warm,
        "rounds": [],
    }
    for r in range(args.rounds):
        row: dict[str, Any] = {}
        for workers in (1, 2):
            for name, make in (("map", map_loader), ("stream", stream_loader)):
                it = iter(make(workers, epoch=r))
                for _ in range(warm):
                    next(it)
                t = time.perf_counter()
                samples = 0
                for _ in range(n_batches):
                    b, _ = next(it)
                    samples += len(b)
                row[f"{name}_w{workers}"] = samples / (time.perf_counter() - t)
                del it
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
        results["rounds"].append(row)
    med = {k: float(np.median([row[k] for row in results["rounds"]])) for k in results["rounds"][0]}
    results["median_samples_per_s"] = med
    print("| workers | map-style samples/s | stream samples/s | stream / map |\n|---:|---:|---:|---:|")
    for w in (1, 2):
        print(
            f"| {w} | {med[f'map_w{w}']:.1f} | {med[f'stream_w{w}']:.1f} | {med[f'stream_w{w}'] / med[f'map_w{w}']:.2f} |"
        )
    write("loader", results)


# -- train -------------------------------------------------------------------------------------------------


def _run_train(config: dict[str, Any]) -> dict[str, Any]:
    from clipcraft.train import train
    from clipcraft.train.config import TrainConfig

    t = time.perf_counter()
    result = train(TrainConfig.from_dict(config))
    seconds = time.perf_counter() - t
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["type"] == "epoch"]
    return {
        "seconds": seconds,
        "steps": result.steps,
        "epochs": [
            {k: r[k] for k in ("epoch", "val_loss", "i2t_r1", "t2i_r1", "recall_mean") if k in r}
            for r in epochs
        ],
    }


def bench_train(args: argparse.Namespace) -> None:
    import yaml

    shards = flickr_shards(args.work)
    cache_dir = args.work / "train-feature-cache"  # shared by the seeds: each kind encodes its captions once
    captions = yaml.safe_load(RECIPE.read_text())["captions_per_image"]
    out: dict[str, Any] = {
        "epochs": args.epochs,
        "seeds": args.seeds,
        "captions_per_image": captions,
        "cache_dir": str(cache_dir),
        "runs": [],
    }
    for seed in args.seeds:
        # the recipe on both sides: a locked, cached text tower and its captions per image
        common = {
            "epochs": args.epochs,
            "seed": seed,
            "val_data": str(FLICKR),
            "val_split": "dev",
            "feature_cache": True,
            "cache_dir": str(cache_dir),
            "captions_per_image": captions,
            **({"num_workers": args.train_workers} if args.train_workers is not None else {}),
        }
        for name, overrides in (
            ("map", {}),
            ("stream", {"data": str(shards), "train_num_samples": 6000, "shuffle_buffer": 1000}),
        ):
            config = recipe(**common, **overrides, output_dir=str(args.work / f"train-{name}-{seed}"))
            run = _run_train(config)
            run.update(name=name, seed=seed)
            last = run["epochs"][-1]
            print(
                f"{name} seed {seed}: {run['steps']} steps in {run['seconds']:.0f} s, dev mean recall {last['recall_mean']:.4f}"
            )
            out["runs"].append(run)
    print(
        "| data | seed | steps | minutes | dev R@1 i2t | dev R@1 t2i | dev mean recall |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in out["runs"]:
        e = r["epochs"][-1]
        print(
            f"| {r['name']} | {r['seed']} | {r['steps']} | {r['seconds'] / 60:.1f} | {e['i2t_r1']:.4f} | {e['t2i_r1']:.4f} | {e['recall_mean']:.4f} |"
        )
    write("train", out)


# -- ddp ---------------------------------------------------------------------------------------------------


def bench_ddp(args: argparse.Namespace) -> None:
    shards = flickr_shards(args.work)
    base = recipe(
        data=str(shards),
        train_num_samples=6000,
        resampled=True,
        stream_deterministic=True,
        max_steps=args.steps,
        log_every=1,
        precision="fp32",
        num_workers=1,
        patch_dropout=0.0,  # patch dropout draws its own random tokens per rank
        # no dropout: each process draws its own masks, so 2 x 32 could not match 1 x 64 with it
        model_overrides={"image.model_kwargs": {"img_size": 112, "global_pool": "avg"}, "head.dropout": 0.0},
    )
    single_dir, ddp_dir = args.work / "ddp-single", args.work / "ddp-two"
    single = dict(base, batch_size=2 * args.batch_size, output_dir=str(single_dir))
    two = dict(base, batch_size=args.batch_size, output_dir=str(ddp_dir))
    t = time.perf_counter()
    _run_train(single)
    t_single = time.perf_counter() - t
    config_file = args.work / "ddp.json"
    config_file.write_text(json.dumps(two))
    script = args.work / "ddp_run.py"
    script.write_text(
        "import json, sys\nfrom clipcraft.train import train\nfrom clipcraft.train.config import TrainConfig\n"
        "train(TrainConfig.from_dict(json.load(open(sys.argv[1]))))\n"
    )
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
         "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(script), str(config_file)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    t_two = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])

    def losses(run: Path) -> list[float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["type"] == "step"]

    a, b = losses(single_dir), losses(ddp_dir)
    print(
        f"| step | 1 process x {2 * args.batch_size} | 2 processes x {args.batch_size} | abs diff |\n|---:|---:|---:|---:|"
    )
    for i, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        print(f"| {i} | {x:.6f} | {y:.6f} | {abs(x - y):.1e} |")
    write(
        "ddp",
        {
            "single": a,
            "two_process": b,
            "max_abs_diff": max(abs(x - y) for x, y in zip(a, b, strict=True)),
            "seconds_single": t_single,
            "seconds_two": t_two,
            "global_batch": 2 * args.batch_size,
        },
    )


# -- index -------------------------------------------------------------------------------------------------


def synthetic_chunks(n: int, d: int, seed: int, chunk: int = 500_000, subspace: int = 64) -> Any:
    """(vectors, keys) chunks of unit float32 vectors clustered in a random ``subspace``-dim subspace (the
    generator of bench_search.py: Zipf-like cluster sizes, a spread per cluster, a small isotropic part)."""
    rng = np.random.default_rng(seed)
    clusters = max(10, n // 200)
    basis = np.linalg.qr(rng.normal(size=(d, subspace)))[0].T.astype(np.float32)  # (S, D)
    centers = rng.normal(size=(clusters, subspace)).astype(np.float32)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    p = weights / weights.sum()
    spread = rng.uniform(0.25, 0.6, clusters).astype(np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        c = rng.choice(clusters, m, p=p)
        z = centers[c] + spread[c, None] * rng.normal(size=(m, subspace)).astype(np.float32)
        x = z @ basis + 0.03 * rng.normal(size=(m, d)).astype(np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True), [str(i) for i in range(start, start + m)]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_index(args: argparse.Namespace) -> None:
    from clipcraft.search.embedding_shards import read_manifest, write_arrays_as_shards

    n, d, q = args.n, args.dim, 1000
    emb, idx = args.work / f"emb-{n}x{d}", args.work / f"index-{n}x{d}-{args.storage}"
    queries_file = args.work / f"queries-{n}x{d}.npy"
    t = time.perf_counter()
    if read_manifest(emb) is None or not queries_file.is_file():
        held: list[np.ndarray] = []

        def parts() -> Any:
            for vectors, keys in synthetic_chunks(n + q, d, seed=0):
                keep = [i for i, k in enumerate(keys) if int(k) < n]
                if len(keep) < len(keys):
                    held.append(vectors[len(keep) :])
                yield vectors[keep], [keys[i] for i in keep]

        write_arrays_as_shards(
            emb, parts(), dim=d, dtype="float16", model_identity="synthetic", source="synthetic"
        )
        np.save(queries_file, np.concatenate(held).astype(np.float16).astype(np.float32))
    gen_s = time.perf_counter() - t
    print(f"embedding shards: {n:,} x {d} float16, {du(emb) / 2**30:.2f} GiB ({gen_s:.0f} s)")

    build = (
        "import sys, json; from clipcraft.search.ann import IndexConfig; "
        "from clipcraft.search.shard_index import build_index_from_shards; "
        f"m = build_index_from_shards(sys.argv[1], sys.argv[2], IndexConfig(kind='ivf', target_recall={args.target_recall}, "
        f"train_per_list={args.train_per_list}, nlist={args.nlist}, ivf_storage='{args.storage}', "
        f"refine_factor={args.refine})); print(json.dumps(m['index']))"
    )
    built = args.work / f"{idx.name}.build.json"  # the build's figures, for a later --phase search
    if args.phase in ("all", "build"):
        t = time.perf_counter()
        env = {**os.environ, "CLIPCRAFT_LOG_MEMORY": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", build, str(emb), str(idx)], capture_output=True, text=True, env=env
        )
        build_s = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
        lines = proc.stdout.strip().splitlines()
        info = json.loads(lines[-1])
        phases = [line for line in lines if line.startswith("[build]")]
        print(f"build: {build_s:.0f} s, peak RSS {peak_gib:.2f} GiB, {info}", *phases, sep="\n")
        built.write_text(
            json.dumps(
                {
                    "build_s": build_s,
                    "peak_gib": peak_gib,
                    "info": info,
                    "memory_phases": phases,
                    "load_during_build": os.getloadavg(),
                    "threads": os.environ.get("OMP_NUM_THREADS"),
                }
            )  # fmt: skip
        )
        if args.phase == "build":
            return
    saved = json.loads(built.read_text())
    build_s, peak_gib = saved["build_s"], saved["peak_gib"]
    info = json.loads((idx / "manifest.json").read_text())["index"]  # as built, or as retune_index left it

    opens = []
    for _ in range(3):
        code = (
            "import time, sys; t = time.perf_counter(); from clipcraft.search.index import Index; "
            "u = time.perf_counter(); Index.load(sys.argv[1]); print(u - t, time.perf_counter() - u)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(idx)], capture_output=True, text=True, check=True
        )
        opens.append([float(v) for v in out.stdout.strip().splitlines()[-1].split()])
    print(f"fresh process: (import clipcraft.search.index s, Index.load s): {opens}")

    import faiss

    from clipcraft.search.index import Index
    from clipcraft.search.shard_index import _NpyRows, exact_topk

    faiss.omp_set_num_threads(1)  # one query at a time: threads only add overhead
    index = Index.load(idx)
    queries = np.load(queries_file)
    t = time.perf_counter()
    truth = exact_topk(_NpyRows(idx / "vectors.npy"), queries, 10)
    exact_s = time.perf_counter() - t
    for query in queries[:50]:  # warm-up: page in the lists and the vectors the queries touch
        index.search_vectors(query[None], 10)
    times, found = [], []
    for query in queries:
        t = time.perf_counter()
        _, ids = index.search_vectors(query[None], 10)
        times.append(time.perf_counter() - t)
        found.append(ids[0])
    recall = float(
        np.mean([len(set(f.tolist()) & set(tr.tolist())) / 10 for f, tr in zip(found, truth, strict=True)])
    )
    ms = np.asarray(times) * 1000
    result = {
        "n": n,
        "dim": d,
        "dtype": "float16",
        "queries": q,
        "index": info,
        "embedding_shards_gib": du(emb) / 2**30,
        "generate_s": gen_s,
        "build_s": build_s,
        "build_peak_rss_gib": peak_gib,
        "build_memory_phases": saved.get("memory_phases", []),
        "build_threads": saved.get("threads"),
        "load_during_build": saved.get("load_during_build"),
        "load_before_search": os.getloadavg(),
        "index_on_disk_gib": du(idx) / 2**30,
        "index_files_gib": {p.name: p.stat().st_size / 2**30 for p in idx.iterdir() if p.is_file()},
        "open_s": [o[1] for o in opens],
        "import_s": [o[0] for o in opens],
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "recall_at_10": recall,
        "exact_search_1000_queries_s": exact_s,
    }
    print(
        f"| {n:,} x {d} | {build_s / 60:.1f} min | {peak_gib:.2f} GiB | {result['index_on_disk_gib']:.2f} GiB | "
        f"{result['p50_ms']:.2f} / {result['p99_ms']:.2f} ms | {recall:.4f} | {np.median([o[1] for o in opens]):.2f} s |"
    )
    write(f"index-{n}-{args.storage}", result)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["loader", "train", "ddp", "index"], required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale-bench"))
    parser.add_argument("--batch-size", type=int, default=64, help="loader: batch; ddp: per-process batch")
    parser.add_argument("--batches", type=int, default=20, help="loader: timed batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--train-workers", type=int, default=None, help="train: loader workers (default: the recipe's)"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--train-per-list", type=int, default=32)
    parser.add_argument("--target-recall", type=float, default=0.97)
    parser.add_argument("--storage", choices=["sq8", "pq", "pq4fs"], default="pq4fs", help="index: IVF codes")
    parser.add_argument("--refine", type=int, default=8, help="index: candidates re-ranked = k x this")
    parser.add_argument(
        "--phase",
        choices=["all", "build", "search"],
        default="all",
        help="index: build only, or measure opening/latency/recall of the index a build phase left (so the "
        "latencies can be taken on a quiet machine)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.only != "index" and not FLICKR.is_dir():
        raise SystemExit(f"{FLICKR} is absent: the {args.only} benchmark needs Flickr8k.")
    {"loader": bench_loader, "train": bench_train, "ddp": bench_ddp, "index": bench_index}[args.only](args)


if __name__ == "__main__":
    main()
