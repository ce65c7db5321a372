"""fp32 against bf16 through the one encoder: embed throughput and how far bf16 results are from fp32.

    .venv/bin/python bench/bench_precision.py --out bench/results/precision.json [--model runs/demo/model]

Part 1, throughput: the seed architecture (random weights: no pretrained image tower offline) and
``minilm-vit-tiny`` embed the same Flickr8k images through :func:`clipcraft.encoding.encode_images` (the
loop of ``index build`` and ``eval``), fp32 and bf16 alternating within each round; images/s is the median
over rounds. Part 2, tolerance: for a trained model (``--model``; default: the ``minilm-vit-tiny`` preset)
on its own test data (``--data``/``--split``; default Flickr8k test), retrieval in fp32 and in bf16 (metric
deltas, cosine of each image's two embeddings) and the top-10 of 50 text queries (overlap). The CPU and its bf16 support (from /proc/cpuinfo) are named in the
output: on a CPU without native bf16, bf16 is emulated (float32 kernels on bf16-rounded operands) and slow.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


def cpu_info() -> dict[str, Any]:
    """The CPU model and whether it has native bf16 (AVX512-BF16, AMX), from /proc/cpuinfo."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("unknown", ""):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    return {"model": name, "bf16_flags": bf16, "native_bf16": bool(bf16), "avx2": "avx2" in flags}


def throughput(preset: str, paths: list[str], batch_size: int, rounds: int) -> dict[str, Any]:
    import torch

    from clipcraft import create_model
    from clipcraft.encoding import EncodeSettings, encode_images
    from clipcraft.precision import Precision

    torch.manual_seed(0)
    model = create_model(preset, pretrained=False if preset == "seed" else None).eval()
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    vectors: dict[str, np.ndarray] = {}
    encode_images(model, paths[:batch_size], EncodeSettings(batch_size=batch_size, workers=0))  # warm-up
    for r in range(rounds):
        for p in (Precision.FP32, Precision.BF16):
            settings = EncodeSettings(precision=p, batch_size=batch_size, workers=1)
            start = time.perf_counter()
            vectors[p.value] = encode_images(model, paths, settings).vectors
            times[p.value].append(time.perf_counter() - start)
        print(
            f"{preset} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items())
        )
    a, b = vectors["fp32"], vectors["bf16"]
    rate = {k: len(paths) / float(np.median(v)) for k, v in times.items()}
    return {
        "preset": preset,
        "images": len(paths),
        "batch_size": batch_size,
        "rounds": rounds,
        "fp32_images_per_s": round(rate["fp32"], 2),
        "bf16_images_per_s": round(rate["bf16"], 2),
        "bf16_over_fp32": round(rate["bf16"] / rate["fp32"], 3),
        "min_cosine_bf16_to_fp32": round(float((a * b).sum(1).min()), 5),
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }


def tolerance(model_path: str | None, data: Path, split: str, limit: int, queries: int) -> dict[str, Any]:
    import torch

    from clipcraft import create_model, load
    from clipcraft.encoding import EncodeSettings, encode_images, encode_texts
    from clipcraft.evaluation.runners import RETRIEVAL_KEYS, evaluate_retrieval, load_caption_records
    from clipcraft.precision import Precision

    torch.manual_seed(0)
    model = load(model_path) if model_path else create_model("minilm-vit-tiny").eval()
    out: dict[str, Any] = {
        "model": model_path or "minilm-vit-tiny preset (random image tower)",
        "data": f"{data} [{split}]",
    }
    results = {}
    for p in ("fp32", "bf16"):
        r = evaluate_retrieval(model, data, split=split, limit=limit, settings=EncodeSettings(workers=1), precision=p)  # fmt: skip
        results[p] = r
    out["retrieval"] = {
        k: {"fp32": results["fp32"][k], "bf16": results["bf16"][k], "delta": results["bf16"][k] - results["fp32"][k]}
        for k in RETRIEVAL_KEYS
    }  # fmt: skip
    paths, captions, _, _ = load_caption_records(data, split, limit)
    texts = [c[0] for c in captions[:queries]]
    emb = {}
    for p in (Precision.FP32, Precision.BF16):
        s = EncodeSettings(precision=p, workers=1)
        emb[p.value] = (encode_images(model, paths, s).vectors, encode_texts(model, texts, s).vectors)
    (i32, t32), (i16, t16) = emb["fp32"], emb["bf16"]
    top32 = np.argsort(-(t32 @ i32.T), axis=1)[:, :10]
    top16 = np.argsort(-(t16 @ i16.T), axis=1)[:, :10]
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(top32, top16, strict=True)]
    out["images"], out["queries"] = len(paths), len(texts)
    out["image_cosine_bf16_to_fp32"] = {"min": float((i32 * i16).sum(1).min()), "mean": float((i32 * i16).sum(1).mean())}  # fmt: skip
    out["text_cosine_bf16_to_fp32"] = {"min": float((t32 * t16).sum(1).min()), "mean": float((t32 * t16).sum(1).mean())}  # fmt: skip
    out["top10_overlap"] = {"mean": float(np.mean(overlap)), "min": float(np.min(overlap))}
    out["top1_same"] = float(np.mean(top32[:, 0] == top16[:, 0]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64, help="images per throughput pass")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--presets", default="minilm-vit-tiny,seed", help="architectures of the throughput part"
    )
    parser.add_argument("--model", default=None, help="trained model directory for the tolerance part")
    parser.add_argument("--data", default=str(FLICKR), help="caption data set of the tolerance part")
    parser.add_argument("--split", default="test", help="its split")
    parser.add_argument("--limit", type=int, default=1000, help="images of the tolerance part")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "precision.json"))
    args = parser.parse_args(argv)
    if not FLICKR.is_dir():
        print(f"Flickr8k not found at {FLICKR}", file=sys.stderr)
        return 1
    import torch

    from clipcraft.data.folder import scan_images

    paths = [str(FLICKR / "images" / e.path) for e in scan_images(FLICKR / "images")][: args.images]
    report: dict[str, Any] = {
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "throughput": [],
    }
    print(json.dumps(report["cpu"]))
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        report["throughput"].append(throughput(preset, paths, args.batch_size, args.rounds))
        print(json.dumps({k: v for k, v in report["throughput"][-1].items() if k != "seconds"}), flush=True)
    report["tolerance"] = tolerance(args.model, Path(args.data), args.split, args.limit, args.queries)
    print(json.dumps(report["tolerance"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
