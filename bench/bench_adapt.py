"""Benchmark: adapting a pretrained CLIP to CIFAR-10 without forgetting Flickr8k.

Rows: zero-shot, linear probe, the cross-entropy fine-tune, FLYP, FLYP + LoRA on the image tower, FLYP + LoRA on
both towers; each fine-tune with (alpha chosen on CIFAR-10 val) and without (alpha = 1) WiSE-FT. For every row:
CIFAR-10 test top-1, retention (Flickr8k test mean recall, R@1/5/10 both ways, of the row's model, and its share
of the initial model's), trainable parameters, wall time and peak resident memory. Each fine-tune runs in its
own process (``--row NAME``), so its peak memory is its own.

All rows use the same images: the first ``--train-per-class`` CIFAR-10 training images of each class (the
fine-tunes hold ``--val-fraction`` out for early stopping and the WiSE-FT alpha), the first
``--test-per-class`` test images of each class, and the first ``--retention-images`` Flickr8k test images with
all their captions (1,000 = the standard protocol).

Writes ``bench/results/adapt.json`` and ``bench/sections/adapt.md``:

    .venv/bin/python bench/bench_adapt.py --model runs/flickr8k-minilm-vit-tiny/best \\
        --train-per-class 1000 --test-per-class 1000 --retention-images 1000 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_finetune import _machine, _subset_csv  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
# row -> fine-tune settings (None: not a fine-tune)
ROWS: dict[str, dict | None] = {
    "zeroshot": None,
    "linear_probe": None,
    "ce": {"method": "ce"},
    "flyp": {"method": "flyp"},
    "lora_image": {"method": "flyp", "lora_rank": 8, "lora_towers": "image"},
    "lora_both": {"method": "flyp", "lora_rank": 8, "lora_towers": "both"},
}
LABELS = {
    "ce": "cross-entropy fine-tune (image tower + head)",
    "flyp": "FLYP (both towers, CLIP loss on class prompts)",
    "lora_image": "FLYP + LoRA r=8 on the image tower",
    "lora_both": "FLYP + LoRA r=8 on both towers",
}
# What the papers report, to set beside the rows (different models, data and scale: for direction only)
PAPERS = [
    "FLYP (Goyal et al., arXiv 2212.00638): contrastive fine-tuning with class prompts beats cross-entropy "
    "fine-tuning by 4.2 points out-of-distribution on average (ImageNet and its distribution shifts, CLIP ViT-B/16), "
    "and adds in-distribution accuracy too.",
    "WiSE-FT (Wortsman et al., arXiv 2109.01903): mixing zero-shot and fine-tuned weights recovers the zero-shot "
    "model's robustness under distribution shift at no cost in in-distribution accuracy (ImageNet, CLIP ViT-L/14: "
    "+4 to +6 points on the shifts).",
]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_row(name: str, args: argparse.Namespace, train_csv: Path, test_csv: Path) -> dict:
    """One row, in this process: its metrics, time and peak memory."""
    from clipcraft.encoding import EncodeSettings
    from clipcraft.evaluation.runners import evaluate_linear_probe
    from clipcraft.finetune import FinetuneConfig, finetune
    from clipcraft.finetune.adapt import measure_retention
    from clipcraft.model import load
    from clipcraft.precision import Precision

    start = time.perf_counter()
    flickr = str(Path(args.data) / "flickr8k")  # retention: its first --retention-images test images
    if ROWS[name] is None:
        model = load(args.model)
        total = sum(p.numel() for p in model.parameters())
        if name == "zeroshot":
            from clipcraft.evaluation.runners import evaluate_zeroshot

            top1 = evaluate_zeroshot(model, test_csv)["top1"]
            trainable = 0
        else:
            settings = EncodeSettings(batch_size=64, workers=args.workers)
            probe = evaluate_linear_probe(model, train_csv, test_csv, features="post", settings=settings)
            top1 = probe["top1"]
            trainable = model.embed_dim * 10 + 10
        kept = measure_retention(model, flickr, "test", args.retention_images, Precision.FP32, 64)
        return {"top1": top1, "retention": kept["score"], "trainable_params": trainable, "total_params": total,
                "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(_peak_rss_mb())}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"bench-adapt-{name}-") as tmp:
        fields = dict(
            model=str(args.model), train=str(train_csv), test=str(test_csv), output_dir=str(Path(tmp) / "run"),
            val_fraction=args.val_fraction, epochs=args.epochs, batch_size=args.batch_size, lr_tower=args.lr_tower,
            lr_text=args.lr_text, lr_head=args.lr_head, warmup_steps=args.warmup_steps, layer_decay=args.layer_decay,
            alphas=tuple(float(a) for a in args.alphas.split(",")), num_workers=args.workers,
            retention=flickr, retention_split="test", retention_limit=args.retention_images, patience=0,
            retention_val_split="dev", wise_keep=args.wise_keep,
        )  # fmt: skip
        fields.update(ROWS[name] or {})
        if fields.get("lora_rank"):
            fields["lr_tower"] = fields["lr_text"] = (
                args.lr_lora
            )  # adapters start at zero and need a larger rate
        summary = finetune(FinetuneConfig.from_dict(fields)).summary
    test, kept = summary["test"], summary["retention"]
    return {
        "zeroshot_top1": test["zeroshot"]["top1"],
        "finetuned_top1": test["finetuned"]["top1"],
        "wise_top1": test["wise"]["top1"],
        "alpha": summary["alpha"],
        "initial_retention": kept["initial"]["score"],
        "finetuned_retention": kept["finetuned"]["score"],
        "wise_retention": kept["wise"]["score"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "steps": summary["steps"],
        "best_epoch": summary["best_epoch"],
        "wise_keep": args.wise_keep,
        "wise": [
            {k: r[k] for k in ("alpha", "top1", "retention_val_kept") if k in r} for r in summary["wise"]
        ],
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(_peak_rss_mb()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the 'pretrained CLIP': a saved or importable model")
    parser.add_argument("--data", default=str(DATA), help="folder holding cifar10/ and flickr8k/")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=1000)
    parser.add_argument("--retention-images", type=int, default=1000, help="Flickr8k test images (1000: all)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-tower", type=float, default=1e-4)
    parser.add_argument("--lr-text", type=float, default=1e-5)
    parser.add_argument("--lr-head", type=float, default=1e-3)
    parser.add_argument("--lr-lora", type=float, default=1e-3)
    parser.add_argument("--layer-decay", type=float, default=1.0)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument(
        "--wise-keep",
        type=float,
        default=None,
        help="choose alpha as the best CIFAR-10 val top-1 keeping this share of Flickr8k *dev* recall (0.9)",
    )
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    parser.add_argument("--note", default="", help="what the pretrained model is, for the section")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child process: one row
    parser.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "adapt.json"))
    parser.add_argument("--section", default=str(ROOT / "bench" / "sections" / "adapt.md"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the section from --out's JSON")
    args = parser.parse_args(argv)
    if args.render_only:
        Path(args.section).write_text(render(json.loads(Path(args.out).read_text())))
        return 0

    if args.row is not None:  # the child: one row, result to --row-out
        work = Path(args.work)
        result = run_row(args.row, args, work / "train.csv", work / "test.csv")
        Path(args.row_out).write_text(json.dumps(result))
        return 0

    data = Path(args.data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "model": str(args.model),
        "command": " ".join([".venv/bin/python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": _machine(),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("out", "section", "row", "row_out", "work")
        },
        "results": {},
        "failed": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-adapt-") as tmp:
        work = Path(tmp)
        _, n_train = _subset_csv(data / "cifar10" / "train", args.train_per_class, work / "train.csv")
        _, n_test = _subset_csv(data / "cifar10" / "test", args.test_per_class, work / "test.csv")
        report["subsets"] = {"train_images": n_train, "test_images": n_test,
                             "retention_images": args.retention_images}  # fmt: skip
        for name in args.rows.split(","):
            child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
            child += ["--row", name, "--row-out", str(work / f"{name}.json"), "--work", str(work)]
            print(f"== {name}", flush=True)
            done = subprocess.run(child, check=False)
            if done.returncode != 0:
                report["failed"][name] = f"exit status {done.returncode}"
            else:
                report["results"][name] = json.loads((work / f"{name}.json").read_text())
            out.write_text(json.dumps(report, indent=2) + "\n")
    section = Path(args.section)
    section.write_text(render(report))
    print(render(report))
    return 0


def _goals(res: dict) -> list[str]:
    """The issue's goals, each said met, not met or not measured, from the rows."""
    out = ["Goals:", ""]
    ce = res.get("ce")
    adapted = [(f"{n} {w}", res[n][f"{w}_top1"], res[n][f"{w}_retention"] / res[n]["initial_retention"])
               for n in ("flyp", "lora_image", "lora_both") if n in res and res[n]["initial_retention"] > 0
               for w in ("finetuned", "wise")]  # fmt: skip
    keeping = [a for a in adapted if a[2] >= 0.9]
    if ce is None or not keeping:
        out.append(
            "- Best adapted model beats the cross-entropy fine-tune with >= 90% retention: not measured."
        )
    else:
        best = max(keeping, key=lambda a: a[1])
        verdict = "met" if best[1] > ce["finetuned_top1"] else "not met"
        out.append(f"- Best adapted model keeping >= 90% retention ({best[0]}: {best[1]:.3f}, kept {best[2]:.0%}) vs "
                   f"the cross-entropy fine-tune ({ce['finetuned_top1']:.3f}): {verdict}.")  # fmt: skip
    lora = [
        (n, res[n]["trainable_params"] / res[n]["total_params"])
        for n in ("lora_image", "lora_both")
        if n in res
    ]
    if lora:
        shares = ", ".join(f"{n} {share:.2%}" for n, share in lora)
        out.append(
            f"- LoRA trains < 5% of the parameters: {'met' if all(x < 0.05 for _, x in lora) else 'not met'} ({shares})."
        )
    else:
        out.append("- LoRA trains < 5% of the parameters: not measured.")
    stuck = [n for n in ("ce", "flyp", "lora_image", "lora_both") if n in res and res[n]["best_epoch"] == 0]
    if stuck:
        out.append(f"- No fine-tuned epoch beat the zero-shot head on validation for {', '.join(stuck)}, so early "
                   "stopping kept the initial weights there and those rows equal zero-shot: at this scale (the model, "
                   "data and epochs above) the comparison between those methods is not informative.")  # fmt: skip
    return out


def _wise_curves(res: dict) -> list[str]:
    """A table of every fine-tune's WiSE-FT mixtures on validation: CIFAR-10 val top-1 / share of the initial
    model's Flickr8k dev recall kept (only for rows run with ``--wise-keep``)."""
    names = [n for n in ("ce", "flyp", "lora_image", "lora_both")
             if n in res and all("retention_val_kept" in w for w in res[n].get("wise", []))
             and res[n].get("wise")]  # fmt: skip
    if not names:
        return []
    alphas = sorted({w["alpha"] for n in names for w in res[n]["wise"]})
    out = ["", "WiSE-FT on validation, every mixture: CIFAR-10 val top-1 / share of the initial model's Flickr8k "
           "dev mean recall kept (alpha 0 = the initial model, 1 = the fine-tuned one):", "",
           "| fine-tune | " + " | ".join(f"alpha {a:g}" for a in alphas) + " |",
           "|---|" + "---:|" * len(alphas)]  # fmt: skip
    for n in names:
        by = {w["alpha"]: w for w in res[n]["wise"]}
        cells = [
            f"{by[a]['top1']:.3f} / {by[a]['retention_val_kept']:.0%}" if a in by else "" for a in alphas
        ]
        out.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
    return out


def render(report: dict) -> str:
    """The BENCHMARKS.md section of a report."""
    res, m, s, sub = report["results"], report["machine"], report["settings"], report["subsets"]
    s = {**s, "note": s.get("note", "")}
    base = next((r.get("initial_retention", r.get("retention")) for r in res.values()), None)
    lines = [
        "## Adapting a pretrained CLIP to CIFAR-10 without forgetting Flickr8k",
        "",
        f"Pretrained model: `{report['model']}`. Script: `bench/bench_adapt.py`; results in `bench/results/adapt.json`.",
        *([s["note"], ""] if s.get("note") else []),
        f"Machine: {m['cpu']} (no native bf16: every row ran in fp32), {m['cpu_count']} cores shared with other "
        f"jobs, {'GPU ' + m['cuda'] if m['cuda'] else 'no GPU'}, torch {m['torch']}.",
        "",
        f"Data: CIFAR-10, the first {s['train_per_class']} training images of each class ({sub['train_images']:,}; "
        f"{s['val_fraction']:.0%} of them held out as validation for early stopping and the WiSE-FT alpha) and the "
        f"first {s['test_per_class']} test images of each class ({sub['test_images']:,} of 10,000). Retention: "
        f"Flickr8k test retrieval mean recall (R@1/5/10, image->text and text->image) on the first "
        f"{sub['retention_images']} of the 1,000 test images with all their captions"
        + (
            " (the standard protocol)."
            if sub["retention_images"] == 1000
            else " (not the full standard protocol)."
        )
        + f" Fine-tunes: {s['epochs']} epoch(s), batch {s['batch_size']}, lr {s['lr_tower']:g} image tower, "
        f"{s['lr_text']:g} text tower (FLYP), {s['lr_head']:g} classifier head, {s['lr_lora']:g} LoRA, "
        f"layer decay {s['layer_decay']:g}, alphas {s['alphas']}."
        + (
            f" WiSE-FT alpha: the best CIFAR-10 val top-1 among the mixtures that keep >= {s['wise_keep']:.0%} of "
            f"the initial model's Flickr8k mean recall on the first {sub['retention_images']} *dev* images "
            "(`--wise-keep`; chosen on dev, reported on test)."
            if s.get("wise_keep")
            else " WiSE-FT alpha: the best CIFAR-10 val top-1."
        ),
        "",
        "| row | CIFAR-10 top-1 | Flickr8k mean recall | kept | trainable params | wall time | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, top1: float, recall: float, r: dict) -> str:
        kept = f"{recall / base:.0%}" if base else "-"
        share = f"{r['trainable_params']:,} ({r['trainable_params'] / r['total_params']:.2%})"
        return (f"| {label} | {top1:.3f} | {recall:.4f} | {kept} | {share} | {r['seconds']:.0f} s | "
                f"{r['peak_rss_mb'] / 1024:.1f} GB |")  # fmt: skip

    if "zeroshot" in res:
        lines.append(
            row(
                "zero-shot (the initial model)",
                res["zeroshot"]["top1"],
                res["zeroshot"]["retention"],
                res["zeroshot"],
            )
        )
    if "linear_probe" in res:
        r = res["linear_probe"]
        lines.append(row("linear probe (towers untouched)", r["top1"], r["retention"], r))
    for name in ("ce", "flyp", "lora_image", "lora_both"):
        if name not in res:
            continue
        r = res[name]
        best = f"best val epoch {r['best_epoch']}" + (
            ": none beat zero-shot, so the initial weights" if r["best_epoch"] == 0 else ""
        )
        lines.append(
            row(f"{LABELS[name]}, alpha 1 ({best})", r["finetuned_top1"], r["finetuned_retention"], r)
        )
        how = (
            f"best val top-1 keeping >= {r['wise_keep']:.0%} of dev recall"
            if r.get("wise_keep")
            else "best val top-1"
        )
        lines.append(
            row(
                f"{LABELS[name]} + WiSE-FT (alpha {r['alpha']:g}: {how})",
                r["wise_top1"],
                r["wise_retention"],
                r,
            )
        )
    for name, why in report.get("failed", {}).items():
        lines.append(f"| {name} | not run: {why} | | | | | |")
    lines += _wise_curves(res)
    lines += ["", *_goals(res)]
    lines += ["", "Wall time and peak memory of a fine-tune row cover its run with and without WiSE-FT together "
              "(one run gives both; its retention is measured on test for the initial, fine-tuned and chosen models "
              "and, with --wise-keep, on dev for every alpha).", "",
              "Beside the papers (their models, data and scale, not ours):", ""]  # fmt: skip
    lines += [f"- {p}" for p in PAPERS]
    lines += ["", "Reproduce:", "", "```", report["command"], "```", ""]
    earlier = report.get("earlier_rows")
    if earlier:  # rows kept from an earlier run of the same protocol (the same model, data and subsets)
        lines += [f"The rows {', '.join(earlier['rows'])} come from an earlier run (alphas "
                  f"{earlier['settings']['alphas']}, WiSE-FT alpha by val top-1 alone):", "", "```",
                  earlier["command"], "```", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
