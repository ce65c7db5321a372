"""Benchmark: CIFAR-10 test top-1 of one saved model, zero-shot vs linear probe vs fine-tuned (and WiSE-FT).

All three use the same image subsets: the first ``--train-per-class`` training images of each class (the
fine-tune holds ``--val-fraction`` of them out for early stopping and the WiSE-FT alpha; the probe holds out
20 % to choose its L2 strength) and the first ``--test-per-class`` test images of each class. Zero-shot,
fine-tuned (alpha = 1) and WiSE-FT (the alpha chosen on val) numbers come from one ``clipcraft finetune`` run
(its test split); the probe is ``clipcraft eval linear-probe``'s runner on the normalised image embeddings.

Writes ``bench/results/finetune.json`` and the markdown section ``bench/sections/finetune.md``:

    .venv/bin/python bench/bench_finetune.py --model runs/flickr8k-minilm-vit-tiny/best \\
        --train-per-class 200 --test-per-class 200 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"


def _subset_csv(root: Path, per_class: int | None, out: Path) -> tuple[Path, int]:
    """An image,label CSV of the first ``per_class`` files (by name) of every class folder under ``root``."""
    rows = ["image,label"]
    for cls in sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        files = sorted(str(p) for p in (root / cls).iterdir() if p.is_file())
        rows += [f"{f},{cls}" for f in (files if per_class is None else files[:per_class])]
    out.write_text("\n".join(rows) + "\n")
    return out, len(rows) - 1


def _machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="saved clipcraft model directory")
    parser.add_argument("--data", default=str(DATA), help="folder holding train/ and test/ class folders")
    parser.add_argument(
        "--train-per-class", type=int, default=200, help="training images per class (all: 1000)"
    )
    parser.add_argument("--test-per-class", type=int, default=200, help="test images per class (all: 1000)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of the training subset for val"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-tower", type=float, default=1e-5)
    parser.add_argument("--lr-head", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="WiSE-FT mixing coefficients")
    parser.add_argument("--workers", type=int, default=1, help="data loader processes")
    parser.add_argument("--skip-probe", action="store_true", help="fine-tune only")
    parser.add_argument("--run-dir", default=None, help="fine-tuning output (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    parser.add_argument("--section", default=str(ROOT / "bench" / "sections" / "finetune.md"))
    args = parser.parse_args(argv)

    from clipcraft.encoding import EncodeSettings
    from clipcraft.evaluation.runners import evaluate_linear_probe
    from clipcraft.finetune import FinetuneConfig, finetune
    from clipcraft.finetune.commands import parse_alphas
    from clipcraft.model import load

    data = Path(args.data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "model": str(args.model),
        "command": " ".join([".venv/bin/python", *[Path(sys.argv[0]).as_posix(), *sys.argv[1:]]]),
        "machine": _machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "section")},
        "results": {},
    }

    def save() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        train_csv, n_train = _subset_csv(data / "train", args.train_per_class, Path(tmp) / "train.csv")
        test_csv, n_test = _subset_csv(data / "test", args.test_per_class, Path(tmp) / "test.csv")
        _, all_train = _subset_csv(data / "train", None, Path(tmp) / "all-train.csv")
        _, all_test = _subset_csv(data / "test", None, Path(tmp) / "all-test.csv")
        report["subsets"] = {
            "train_images": n_train,
            "test_images": n_test,
            "train_images_available": all_train,
            "test_images_available": all_test,
        }
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"

        start = time.perf_counter()
        config = FinetuneConfig.from_dict(
            dict(
                model=str(args.model),
                train=str(train_csv),
                test=str(test_csv),
                output_dir=str(run_dir),
                val_fraction=args.val_fraction,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr_tower=args.lr_tower,
                lr_head=args.lr_head,
                warmup_steps=args.warmup_steps,
                alphas=tuple(parse_alphas(args.alphas)),
                num_workers=args.workers,
                overwrite=True,
            )
        )
        result = finetune(config)
        s = result.summary
        report["results"]["finetune"] = {
            "seconds": round(time.perf_counter() - start, 1),
            "steps": s["steps"],
            "epochs": s["epochs"],
            "best_epoch": s["best_epoch"],
            "num_train": s["data"]["num_train"],
            "num_val": s["data"]["num_val"],
            "val": s["val"],
            "wise": [{k: r[k] for k in ("alpha", "top1", "loss")} for r in s["wise"]],
            "alpha": s["alpha"],
            "test": s["test"],
        }
        save()

        if not args.skip_probe:
            start = time.perf_counter()
            model = load(args.model)
            settings = EncodeSettings(batch_size=64, workers=args.workers, progress=True)
            probe = evaluate_linear_probe(model, train_csv, test_csv, features="post", settings=settings)
            probe["seconds"] = round(time.perf_counter() - start, 1)
            report["results"]["linear_probe"] = {
                k: probe[k]
                for k in ("top1", "top5", "mean_per_class_recall", "num_train", "num_images", "l2", "seconds")
            }
            save()
        if not args.run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)

    section = Path(args.section)
    section.parent.mkdir(parents=True, exist_ok=True)
    section.write_text(render(report))
    print(render(report))
    print(f"Wrote {out} and {section}")
    return 0


def render(report: dict) -> str:
    """The BENCHMARKS.md section for one report."""
    ft = report["results"]["finetune"]
    probe = report["results"].get("linear_probe")
    test, m = ft["test"], report["machine"]
    sub = report["subsets"]
    lines = [
        "## Fine-tuning: CIFAR-10 zero-shot vs linear probe vs fine-tuned",
        "",
        f"Model: `{report['model']}`. Script: `bench/bench_finetune.py`; results in `bench/results/finetune.json`.",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), "
        f"{'GPU ' + m['cuda'] if m['cuda'] else 'no GPU'}, torch {m['torch']}.",
        "",
        f"**Subsets (CPU time budget).** Every row uses the same images: the first "
        f"{report['settings']['train_per_class']} training images of each class ({sub['train_images']:,} in all) "
        f"and the first {report['settings']['test_per_class']} test images of each class ({sub['test_images']:,}), "
        f"out of {sub['train_images_available']:,} / {sub['test_images_available']:,}, so the numbers compare the "
        "methods with each other on this budget, not with published CIFAR-10 results. "
        f"The fine-tune trains on {ft['num_train']:,} of the training images and "
        f"validates on the other {ft['num_val']:,} (stratified, seeded) for early stopping and the WiSE-FT alpha; "
        "the probe chooses its L2 strength on its own 20 % split and refits on all of them.",
        "",
        "| method | test top-1 | test top-5 | mean per-class recall |",
        "|---|---:|---:|---:|",
        f"| zero-shot (class names, 18 built-in templates) | {test['zeroshot']['top1']:.3f} | "
        f"{test['zeroshot']['top5']:.3f} | {test['zeroshot']['mean_per_class_recall']:.3f} |",
    ]
    if probe is not None:
        lines.append(
            f"| linear probe (logistic regression on frozen embeddings, l2 = {probe['l2']:g}) | "
            f"{probe['top1']:.3f} | {probe['top5']:.3f} | {probe['mean_per_class_recall']:.3f} |"
        )
    lines += [
        f"| fine-tuned, alpha = 1 ({ft['steps']} steps, {ft['epochs']} epoch(s), best epoch {ft['best_epoch']}) | "
        f"{test['finetuned']['top1']:.3f} | {test['finetuned']['top5']:.3f} | "
        f"{test['finetuned']['mean_per_class_recall']:.3f} |",
        f"| WiSE-FT, alpha = {ft['alpha']:g} (chosen on val) | {test['wise']['top1']:.3f} | "
        f"{test['wise']['top5']:.3f} | {test['wise']['mean_per_class_recall']:.3f} |",
        "",
        "Validation top-1 by alpha (0 = zero-shot weights, 1 = fine-tuned weights): "
        + ", ".join(f"{r['alpha']:g}: {r['top1']:.3f}" for r in ft["wise"])
        + ".",
        "",
        f"Settings: batch {report['settings']['batch_size']}, lr {report['settings']['lr_tower']:g} (image tower and "
        f"projection) / {report['settings']['lr_head']:g} (classifier head), {report['settings']['warmup_steps']} "
        "warmup steps then cosine, AdamW, weight decay 0.1, random-resized-crop + colour-jitter augmentation. "
        f"Fine-tuning took {ft['seconds']:.0f} s"
        + (f", the probe {probe['seconds']:.0f} s" if probe is not None else "")
        + ".",
        "",
        "Reproduce:",
        "",
        "```",
        report["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
