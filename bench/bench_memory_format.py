"""Training-step throughput of a convolutional image tower in the default (NCHW) and channels-last (NHWC)
memory layouts, side by side (``ImageTower.set_channels_last``; the ``channels_last`` training setting).

One step = the clipcraft image tower (a timm trunk, random weights, ``num_classes=0``) forward on a batch of
random images, a squared-feature loss, backward, AdamW step: the image tower's share of a training step, which
is nearly all of it when the text tower is locked and cached (the offline recipe). Timed steps alternate
between the two layouts (A B B A ...) so that other load on the machine hits both alike; figures are medians.

    .venv/bin/python bench/bench_memory_format.py --models resnet18d convnext_atto --size 112 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import cpu_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(models: list[str], size: int, batch: int, warmup: int, steps: int) -> dict[str, Any]:
    """Median seconds per training step of each model in each layout."""
    import torch

    from clipcraft.config import ImageTowerConfig
    from clipcraft.towers import ImageTower

    out: dict[str, Any] = {}
    for name in models:
        torch.manual_seed(0)
        towers = {"nchw": ImageTower(ImageTowerConfig(name=name)).train()}
        towers["nhwc"] = ImageTower(ImageTowerConfig(name=name)).train()
        towers["nhwc"].load_state_dict(towers["nchw"].state_dict())
        towers["nhwc"].set_channels_last(True)
        optims = {k: torch.optim.AdamW(t.parameters(), lr=1e-4) for k, t in towers.items()}
        images = torch.randn(batch, 3, size, size)
        times: dict[str, list[float]] = {"nchw": [], "nhwc": []}
        order = ["nchw", "nhwc", "nhwc", "nchw"]
        for i in range(2 * (warmup + steps)):
            layout = order[i % 4]
            start = time.perf_counter()
            towers[layout](images).square().mean().backward()
            optims[layout].step()
            optims[layout].zero_grad(set_to_none=True)
            if i >= 2 * warmup:
                times[layout].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {
            **{f"{k}_samples_per_s": round(batch / s, 1) for k, s in med.items()},
            "speedup": round(med["nchw"] / med["nhwc"], 2),
            "timed_steps_each": steps,
        }
        print(name, out[name], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18d", "convnext_atto"])
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory-format.json"))
    args = p.parse_args(argv)
    import torch

    report: dict[str, Any] = {
        "command": ".venv/bin/python bench/bench_memory_format.py " + " ".join(argv or sys.argv[1:]),
        "machine": {**cpu_info(), "cores": os.cpu_count(), "torch": torch.__version__},
        "settings": {k: getattr(args, k) for k in ("size", "batch", "warmup", "steps")},
        "results": {},
    }
    for name in args.models:  # written after each model, so a run cut short keeps what it measured
        report["results"].update(step_seconds([name], args.size, args.batch, args.warmup, args.steps))
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("| image tower | NCHW samples/s | channels-last samples/s | speed-up |\n|---|---:|---:|---:|")
    for name, r in report["results"].items():
        print(f"| {name} | {r['nchw_samples_per_s']} | {r['nhwc_samples_per_s']} | {r['speedup']}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
