"""Two training settings side by side on the same recipe: training speed, run against run.

``clipcraft train`` runs the recipe (``--config``) with setting A's overrides and with setting B's, alternating
A B B A A B ... for ``--rounds`` rounds, each run ``--epochs`` long, one at a time, so that load from elsewhere
on the shared machine hits both alike. Per setting the figures are the median training samples/s of the steps
after each run's first epoch (the first epoch warms the page cache, the allocator and the loader workers) and
the median wall time of a run. Start-up, validation and the test pass are the same work in both settings,
so wall time differs only where the settings make it.

    .venv/bin/python bench/ab_train.py --a precision=fp32 --b precision=bf16 --rounds 2 --epochs 3 \\
        --cache-dir /tmp/f8k-cache --out bench/results/ab-precision-native-bf16.json

The machine (its CPU and whether it has native bf16) is named in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import cpu_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "flickr8k-minilm-vit-tiny.yaml"


def order(rounds: int) -> list[str]:
    """The run order: A B, then B A, alternating for ``rounds`` rounds."""
    return [x for r in range(rounds) for x in (("a", "b") if r % 2 == 0 else ("b", "a"))]


def train_command(
    config: Path, overrides: list[str], epochs: int, run_dir: Path, cache_dir: Path | None
) -> list[str]:
    """One run's ``clipcraft train`` command line: the recipe, the shared settings, then the setting's own."""
    cmd = [sys.executable, "-m", "clipcraft", "train", "--config", str(config)]
    cmd += [f"epochs={epochs}", f"output_dir={run_dir}", "example_sheet=false"]
    if cache_dir is not None:
        cmd.append(f"cache_dir={cache_dir}")
    return cmd + overrides


def steady_rates(run_dir: Path) -> list[float]:
    """The training samples/s the run logged after its first epoch (``metrics.jsonl`` step rows)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [float(r["samples_per_s"]) for r in rows if r.get("type") == "step" and r.get("epoch", 0) >= 1]
    if not rates:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no step rows after the first epoch")
    return rates


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per setting: median samples/s over every steady step of its runs, median run seconds, their count."""
    out = {}
    for side in sorted({r["side"] for r in runs}):
        mine = [r for r in runs if r["side"] == side]
        out[side] = {
            "samples_per_s_median": round(statistics.median(x for r in mine for x in r["rates"]), 1),
            "seconds_median": round(statistics.median(r["seconds"] for r in mine), 1),
            "runs": len(mine),
        }
    if {"a", "b"} <= set(out):
        out["b_over_a"] = {
            "samples_per_s": round(out["b"]["samples_per_s_median"] / out["a"]["samples_per_s_median"], 3),
            "seconds": round(out["b"]["seconds_median"] / max(out["a"]["seconds_median"], 0.1), 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", nargs="+", required=True, help="setting A: key=value overrides")
    p.add_argument("--b", nargs="+", required=True, help="setting B: key=value overrides")
    p.add_argument("--config", default=str(RECIPE))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="per run; the first is not timed")
    p.add_argument("--cache-dir", default=None, help="feature cache shared by the runs (build it beforehand)")
    p.add_argument("--runs", default="/tmp/ab-train", help="folder for the run directories")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch is not timed")
    settings = {"a": args.a, "b": args.b}
    report: dict[str, Any] = {
        "command": ".venv/bin/python bench/ab_train.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": {**cpu_info(), "cores": os.cpu_count()},
        "settings": settings,
        "runs": [],
    }
    for i, side in enumerate(order(args.rounds)):
        run_dir = Path(args.runs) / f"{i:02d}-{side}"
        cmd = train_command(
            Path(args.config),
            settings[side],
            args.epochs,
            run_dir,
            Path(args.cache_dir) if args.cache_dir else None,
        )
        print("$", shlex.join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        report["runs"].append({"side": side, "seconds": round(seconds, 1), "rates": steady_rates(run_dir)})
        report["summary"] = summarize(report["runs"])
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")  # kept after every run
        print(json.dumps(report["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
