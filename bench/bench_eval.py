"""Benchmark: Flickr8k test retrieval, CIFAR-10 zero-shot and linear probe for one saved model.

Runs the same runners as ``clipcraft eval`` and writes ``bench/results/eval-<name>.json`` (updated after each
task, so a cut-short run keeps what finished) and prints a table. Throughput (images/s) is measured on the
first task whose images are not cached.

    .venv/bin/python bench/bench_eval.py --model /tmp/untrained --name untrained-minilm-vit-tiny
    .venv/bin/python bench/bench_eval.py --model runs/flickr8k/final --name trained \
        --cifar-test-per-class 1000 --cifar-train-per-class 1000     # the full protocol
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="saved model directory")
    parser.add_argument("--name", required=True, help="result name: bench/results/eval-<name>.json")
    parser.add_argument("--data", default=str(DATA), help="folder holding flickr8k/ and cifar10/")
    parser.add_argument("--tasks", default="retrieval,zeroshot,linear-probe", help="comma-separated tasks")
    parser.add_argument(
        "--flickr-limit", type=int, default=None, help="first N Flickr8k test images (all: 1000)"
    )
    parser.add_argument(
        "--cifar-test-per-class", type=int, default=None, help="CIFAR-10 test images per class"
    )
    parser.add_argument(
        "--cifar-train-per-class", type=int, default=None, help="CIFAR-10 train images per class"
    )
    parser.add_argument("--features", choices=["post", "pre"], default="post", help="linear-probe features")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 | auto (bf16 where native)")
    parser.add_argument(
        "--cache-dir", default=None, help="embedding cache (default: none, so timings are real)"
    )
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/eval-<name>.json)")
    parser.add_argument("--confusion", default=None, help="zero-shot confusion-matrix PNG (default: none)")
    args = parser.parse_args(argv)

    import torch

    from clipcraft.encoding import EncodeSettings
    from clipcraft.evaluation.runners import (
        evaluate_linear_probe,
        evaluate_retrieval,
        evaluate_zeroshot,
        format_table,
    )
    from clipcraft.model import load
    from clipcraft.precision import resolve_precision

    data = Path(args.data)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"eval-{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(args.model, device=device)
    settings = EncodeSettings(
        precision=resolve_precision(args.precision, device),
        batch_size=args.batch_size,
        workers=args.workers,
        progress=True,
    )
    report: dict = {
        "name": args.name,
        "model": str(args.model),
        "model_config": model.config.to_dict(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": {},
    }

    def save() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task in tasks:
        start = time.perf_counter()
        if task == "retrieval":
            result = evaluate_retrieval(
                model,
                data / "flickr8k",
                split="test",
                limit=args.flickr_limit,
                settings=settings,
                cache_dir=args.cache_dir,
            )
            images = result["num_images"] + result["num_skipped"]
        elif task == "zeroshot":
            result = evaluate_zeroshot(
                model,
                data / "cifar10" / "test",
                limit_per_class=args.cifar_test_per_class,
                confusion_png=args.confusion,
                settings=settings,
                cache_dir=args.cache_dir,
            )
            images = result["num_images"] + result["num_skipped"]
        elif task == "linear-probe":
            if args.cifar_train_per_class is None and args.cifar_test_per_class is None:
                result = evaluate_linear_probe(
                    model,
                    data / "cifar10" / "train",
                    data / "cifar10" / "test",
                    features=args.features,
                    settings=settings,
                    cache_dir=args.cache_dir,
                )
            else:
                result = probe_cifar(
                    model,
                    data / "cifar10",
                    args.cifar_train_per_class,
                    args.cifar_test_per_class,
                    features=args.features,
                    settings=settings,
                    cache_dir=args.cache_dir,
                )
            images = result["num_train"] + result["num_images"] + result["num_skipped"]
        else:
            raise SystemExit(f"unknown task {task!r}; known: retrieval, zeroshot, linear-probe")
        seconds = time.perf_counter() - start
        result["wall_seconds"] = round(seconds, 1)
        result["images_per_second_incl_cache"] = round(images / seconds, 2)
        report["results"][task] = result
        save()
        print(format_table(result), flush=True)
        print(f"({seconds:.1f} s)\n", flush=True)
    print(f"Wrote {out}")
    return 0


def probe_cifar(
    model: Any,
    cifar: Path,
    train_per_class: int | None,
    test_per_class: int | None,
    *,
    features: str = "post",
    settings: Any = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The CIFAR-10 linear probe with separate per-class limits for train and test (the runner takes one limit
    for both); ``None`` keeps every image of that split. ``cifar`` holds the ``train`` and ``test`` class folders."""
    import tempfile

    from clipcraft.evaluation.runners import evaluate_linear_probe

    # Subsets are written as image,label CSVs pointing at the original files, so the cache keys (file lists)
    # match those of the zero-shot run on the same test subset.
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        paths = {}
        described = {}
        for split, limit in (("train", train_per_class), ("test", test_per_class)):
            rows = ["image,label"]
            root = cifar / split
            for cls in sorted(d.name for d in root.iterdir() if d.is_dir()):
                files = sorted(str(p) for p in (root / cls).iterdir() if p.suffix.lower() == ".jpg")
                rows += [f"{f},{cls}" for f in (files if limit is None else files[:limit])]
            paths[split] = Path(tmp) / f"{split}.csv"
            paths[split].write_text("\n".join(rows) + "\n")
            described[split] = f"{root} (first {limit or 'all'} images per class)"
        result = evaluate_linear_probe(
            model, paths["train"], paths["test"], features=features, settings=settings, cache_dir=cache_dir
        )
    result["train_data"], result["test_data"] = described["train"], described["test"]
    return result


if __name__ == "__main__":
    raise SystemExit(main())
