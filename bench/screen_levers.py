"""Screen the recipe's levers on the CPU: one short run per lever, scored on validation data only.

Each lever is the offline recipe (``configs/flickr8k-minilm-vit-tiny.yaml``) with a few config overrides and a
shortened schedule (``--epochs``, the cosine decay compressed into it), trained one run at a time by
``clipcraft train``. Every run is scored on the two validation proxies the project chooses settings by, never
on a test split:

- Flickr8k **dev** mean recall (1,000 images x 5,000 captions), the best epoch and the last;
- CIFAR-10 zero-shot top-1 on the first ``--cifar-per-class`` **train** images of each class (the 18 built-in
  templates), with the run's best model by dev recall.

It also records each run's wall time (caption caching excluded when the cache is shared: pass ``--cache-dir``),
its median training samples/s and its final logit scale, so a lever's cost per epoch shows beside its gain and
the epochs that fit the recipe's 60 minutes can be worked out. The trainer still tests the best model on
Flickr8k test at the end of each run; the screen does not read those figures.

    .venv/bin/python bench/screen_levers.py --epochs 10 --levers baseline,label_smoothing,ema \\
        --cache-dir /tmp/f8k-cache --runs /tmp/lever-screen

After the choice, ``--test`` adds the final figures of every screened run, read from the test splits once:
Flickr8k **test** mean recall of the run's best model (the trainer's own end-of-run test pass, standard
protocol), CIFAR-10 zero-shot on all 10,000 **test** images and the CIFAR-10 linear probe (the first
``--probe-train-per-class`` train images of each class, every test image). They go to the results' ``test``
block and a second table; nothing in the screen's choice reads them. Figures already there are not measured
again (``--rerun`` to redo them).

    .venv/bin/python bench/screen_levers.py --epochs 6 --test

Results go to ``bench/results/lever-screen.json`` (rewritten after every run, so a stopped screen keeps what it
finished; a rerun skips levers already there unless ``--rerun``) and the table to
``bench/sections/levers.md``.
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
import ab_train  # noqa: E402
from bench_eval import probe_cifar  # noqa: E402
from bench_precision import cpu_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ab_train.RECIPE
DATA = ROOT.parent / "shared" / "data"

# A timm CNN in place of the recipe's ViT: the same 112 px input and 0.5 mean/std, no ViT-only kwargs, and no
# patch dropout (it drops ViT tokens).
CNN_112 = ["model_overrides.image.model_kwargs={}", "model_overrides.image.preprocess.input_size=[3,112,112]",
           "patch_dropout=0"]  # fmt: skip


def _cnn_channels_last(timm_name: str, label: str, params: str) -> tuple[str, list[str]]:
    """A timm CNN tower lever, trained channels-last: its description and overrides."""
    what = f"{label} image tower ({params} parameters, channels-last) instead of ViT-Tiny, 112 px; no patch "
    what += "dropout (ViT only)"
    return what, [f"model_overrides.image.name={timm_name}", *CNN_112, "channels_last=true"]


# name -> (what it changes, the overrides on top of the recipe). Values are the literature's or the
# documented ones; the screen looks for a direction, not a tuned value.
LEVERS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("the recipe as it stands", []),
    "label_smoothing": ("label smoothing 0.1 on the CLIP loss (CLIP-rocket)", ["label_smoothing=0.1"]),
    "temperature_lr": (
        "the logit scale on its own rate, 1e-2 (30x the heads'), no weight decay",
        ["lr_logit_scale=0.01"],
    ),
    "temperature_fixed": (
        "the temperature fixed at 0.03 (logit scale 33.3), not learned",
        ["learn_logit_scale=false", "model_overrides.init_logit_scale=3.5066"],
    ),
    "ema": ("validate and save an EMA of the weights, decay 0.995", ["ema_decay=0.995"]),
    "slip": ("SLIP: SimCLR term (weight 1) on a second augmented view of each image", ["ssl_weight=1.0"]),
    "text_augment": (
        "two word-edited variants of every caption (strength 0.1), each cached",
        ["text_augment_variants=2"],
    ),
    "convnext_atto": (
        "ConvNeXt-atto image tower (3.4M parameters) instead of ViT-Tiny, 112 px; no patch dropout (ViT only)",
        ["model_overrides.image.name=convnext_atto", *CNN_112],
    ),
    "resnet18d": (
        "ResNet-18-D image tower instead of ViT-Tiny, 112 px; no patch dropout (ViT only)",
        ["model_overrides.image.name=resnet18d", *CNN_112],
    ),
    "resnet10t": _cnn_channels_last("resnet10t", "ResNet-10-T", "4.9M"),
    "mobilenetv4": _cnn_channels_last("mobilenetv4_conv_small", "MobileNetV4-conv-small", "2.5M"),
    "mobilenetv3": _cnn_channels_last("mobilenetv3_large_100", "MobileNetV3-large", "4.2M"),
    "unlock_minilm": (
        "MiniLM's last layer unlocked at 1e-5: no caption cache, so one caption per image a step",
        ["text_unlocked_groups=1", "lr_text_tower=1e-5", "captions_per_image=1"],
    ),
    "bf16": (
        "bf16 autocast (what the recipe's precision=auto picks on a CPU with AVX512-BF16 or AMX)",
        ["precision=bf16"],
    ),
}

# The recipe says precision=auto, which is bf16 on a CPU with native bf16 and fp32 elsewhere: the screen pins
# fp32 so that every lever but "bf16" trains the same numbers on every machine.
PINNED = ["precision=fp32"]


TITLE = "Training: screening the recipe's levers (short CPU runs, validation data only)"


def train_command(lever: str, epochs: int, seed: int, run_dir: Path, cache_dir: Path | None) -> list[str]:
    """The ``clipcraft train`` command line of one screening run (a lever's own precision comes last, so it
    wins over the pinned one)."""
    return ab_train.train_command(
        RECIPE, [f"seed={seed}", *PINNED, *LEVERS[lever][1]], epochs, run_dir, cache_dir
    )


RECALL_KEYS = ("recall_mean", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def read_run(run_dir: Path) -> dict[str, Any]:
    """Dev recall per epoch, the median training samples/s and the last logit scale from a run's
    ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in rows if r.get("type") == "epoch" and "recall_mean" in r]
    steps = [r for r in rows if r.get("type") == "step"]
    if not epochs:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no validation rows")
    recalls = [round(float(r["recall_mean"]), 4) for r in epochs]
    speeds = [float(r["samples_per_s"]) for r in steps[1:] if "samples_per_s" in r]  # the first step warms up
    return {
        "val_recall_mean_per_epoch": recalls,
        "val_recall_mean_best": max(recalls),
        "val_recall_mean_last": recalls[-1],
        "samples_per_s_median": round(statistics.median(speeds), 1) if speeds else None,
        "logit_scale_last": round(float(steps[-1]["logit_scale"]), 2) if steps else None,
    }


def cifar_zeroshot(
    model: Any, data: Path, per_class: int | None = None, cache_dir: Path | None = None
) -> float:
    """Zero-shot top-1 of a loaded model on CIFAR-10 images: the first ``per_class`` *train* images of each class
    (the validation proxy), or with ``per_class=None`` every image of ``data`` (the test split, after the
    choice)."""
    from clipcraft.evaluation.runners import evaluate_zeroshot

    limit = {} if per_class is None else {"limit_per_class": per_class}
    return round(float(evaluate_zeroshot(model, str(data), cache_dir=cache_dir, **limit)["top1"]), 4)


def run_directory(runs: str | Path, lever: str, epochs: int, seed: int) -> Path:
    """Where one screening run trains."""
    return Path(runs) / f"{lever}-e{epochs}-s{seed}"


def best_model(run_dir: Path) -> Path:
    """A finished run's best model by dev recall (its last model when it kept no best)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return Path(summary["best_model"] or summary["last_model"])


def test_figures(
    run_dir: Path, cifar: Path, known: dict[str, Any] | None = None, probe_train_per_class: int = 1000
) -> dict[str, Any]:
    """A finished run's test figures: Flickr8k test recalls of its best model (from ``summary.json``), CIFAR-10
    zero-shot top-1 on every image of ``cifar/test`` and the CIFAR-10 linear probe (logistic regression on the
    first ``probe_train_per_class`` images of each ``cifar/train`` class, L2 chosen on a split of them, scored on
    every test image). Figures already in ``known`` are kept, not measured again; the two CIFAR passes share an
    embedding cache in ``run_dir/eval-cache``, so the test images are encoded once."""
    from clipcraft import load

    summary = json.loads((run_dir / "summary.json").read_text())
    if "test_recall_mean" not in summary:
        raise RuntimeError(f"{run_dir}/summary.json has no test pass")
    out = dict(known or {})
    out.update({k: round(float(summary[f"test_{k}"]), 4) for k in RECALL_KEYS})
    if "cifar10_test_zeroshot" in out and "cifar10_linear_probe" in out:
        return out
    model, cache = load(best_model(run_dir)), run_dir / "eval-cache"
    if "cifar10_test_zeroshot" not in out:
        out["cifar10_test_zeroshot"] = cifar_zeroshot(model, cifar / "test", cache_dir=cache)
    if "cifar10_linear_probe" not in out:
        probe = probe_cifar(model, cifar, probe_train_per_class, None, cache_dir=cache)
        out["cifar10_linear_probe"] = round(float(probe["top1"]), 4)
        out["linear_probe_l2"] = probe["l2"]
    return out


def screen_one(lever: str, args: argparse.Namespace) -> dict[str, Any]:
    from clipcraft import load

    run_dir = run_directory(args.runs, lever, args.epochs, args.seed)
    cmd = train_command(
        lever, args.epochs, args.seed, run_dir, Path(args.cache_dir) if args.cache_dir else None
    )
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    out = {"what": LEVERS[lever][0], "overrides": LEVERS[lever][1], "seconds": round(seconds, 1)}
    out.update(read_run(run_dir))
    out["cifar10_train_zeroshot"] = cifar_zeroshot(
        load(best_model(run_dir)), Path(args.cifar_train), args.cifar_per_class
    )
    return out


def same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two ``cpu_info`` records name the same kind of CPU: model, core count and native bf16."""
    return all(a.get(k) == b.get(k) for k in ("model", "cores", "native_bf16"))


def _vs_baseline(rows: dict[str, dict[str, Any]], name: str, key: str, digits: int) -> str:
    """``rows[name][key]`` minus the baseline's, signed; empty for the baseline itself or without one."""
    if name == "baseline" or "baseline" not in rows:
        return ""
    return f"{rows[name][key] - rows['baseline'][key]:+.{digits}f}"


def render(report: dict[str, Any]) -> str:
    """The BENCHMARKS section: one row per lever, its change from the baseline, its cost."""
    s = report["settings"]
    rows = report["results"]
    z_key = "cifar10_train_zeroshot"
    lines = [
        f"## {report.get('title', TITLE)}",
        "",
        f"`{report['command']}` on {report['machine']['model']} ({report['machine']['cores']} cores, native "
        f"bf16: {'yes' if report['machine']['native_bf16'] else 'no'}). Each row is the recipe with one lever, "
        f"{s['epochs']} epochs (the cosine schedule compressed into them), seed {s['seed']}, one run at a time, "
        "in fp32 (pinned: the recipe's precision=auto would pick bf16 on a CPU with native bf16) except the "
        "bf16 lever. "
        "Scores are validation proxies only: Flickr8k dev mean recall (1,000 images x 5,000 captions; best "
        f"epoch / last) and CIFAR-10 zero-shot top-1 on the first {s['cifar_per_class']} *train* images of each "
        "class, with the run's best model. Time per epoch is the run's whole wall time over its epochs (start-up, "
        "validation, the final test pass and the zero-shot proxy included, so it overstates a long run's cost: "
        "the 58-epoch recipe runs at about 56 s an epoch on the AVX2-only CPU); the 60-minute column is how many epochs of that cost "
        "fit the recipe's hour, a lower bound. Seed noise at this "
        "length: two seeds of one setting differ by about 0.004 in dev recall (`bench/results/"
        "temperature-ablation.json`), so a difference under 0.005 is not a finding.",
        "",
        "| lever | dev mean recall, best / last | vs baseline | CIFAR-10 train zero-shot | vs baseline "
        "| samples/s | s per epoch | epochs in 60 min | logit scale at the end |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        per_epoch = r["seconds"] / s["epochs"]
        d_rec, d_zs = _vs_baseline(rows, name, "val_recall_mean_best", 4), _vs_baseline(rows, name, z_key, 3)
        lines.append(
            f"| {name}: {r['what']} | {r['val_recall_mean_best']:.4f} / {r['val_recall_mean_last']:.4f} | {d_rec} "
            f"| {r['cifar10_train_zeroshot']:.3f} | {d_zs} | {r['samples_per_s_median']} | {per_epoch:.0f} "
            f"| {int(3600 // per_epoch)} | {r['logit_scale_last']} |"
        )
    for name, why in report.get("failed", {}).items():
        lines.append(f"| {name}: {LEVERS.get(name, ('?', []))[0]} | failed: {why} | | | | | | | |")
    lines.append("")
    if report.get("test"):
        probe_n = report.get("test_settings", {}).get("probe_train_per_class", 1000)
        lines += render_test(report["test"], s["epochs"], probe_n)
    return "\n".join(lines) + "\n"


def render_test(
    test: dict[str, dict[str, float]], epochs: int, probe_train_per_class: int = 1000
) -> list[str]:
    """The second table: the same runs' test figures, read after the screen (never used to choose)."""
    lines = [
        f"The same {epochs}-epoch runs on the test splits (`--test`, read once after the screen; nothing above "
        "chose by them): Flickr8k test, standard protocol, the run's best model by dev recall; CIFAR-10 "
        "zero-shot on all 10,000 test images; CIFAR-10 linear probe (logistic regression on the normalized "
        f"image embeddings of the first {probe_train_per_class} train images per class, L2 chosen on a fifth "
        "of them, scored on all 10,000 test images).",
        "",
        "| lever | test mean recall | vs baseline | i2t R@1 / R@5 / R@10 | t2i R@1 / R@5 / R@10 "
        "| CIFAR-10 test zero-shot | vs baseline | CIFAR-10 linear probe | vs baseline |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    has_probe = {name for name, r in test.items() if "cifar10_linear_probe" in r}
    for name, r in test.items():
        d_rec, d_zs = (
            _vs_baseline(test, name, "recall_mean", 4),
            _vs_baseline(test, name, "cifar10_test_zeroshot", 3),
        )
        probe = d_probe = "not run"
        if name in has_probe:
            probe = f"{r['cifar10_linear_probe']:.3f}"
            d_probe = _vs_baseline(test, name, "cifar10_linear_probe", 3) if "baseline" in has_probe else ""
        lines.append(
            f"| {name} | {r['recall_mean']:.4f} | {d_rec} | {r['i2t_r1']:.3f} / {r['i2t_r5']:.3f} / "
            f"{r['i2t_r10']:.3f} | {r['t2i_r1']:.3f} / {r['t2i_r5']:.3f} / {r['t2i_r10']:.3f} "
            f"| {r['cifar10_test_zeroshot']:.3f} | {d_zs} | {probe} | {d_probe} |"
        )
    lines.append("")
    return lines


def add_test_figures(out: Path, section: Path, args: argparse.Namespace) -> int:
    """Read each screened run's test figures into ``report["test"]`` (only those not there yet, unless
    ``--rerun``)."""
    report = json.loads(out.read_text())
    test = report.setdefault("test", {})
    for lever in report["results"]:
        known = {} if args.rerun else test.get(lever, {})
        if "cifar10_linear_probe" in known:
            continue
        print(f"== {lever}: test figures", flush=True)
        settings = report["settings"]
        run_dir = run_directory(args.runs, lever, settings["epochs"], settings["seed"])
        test[lever] = test_figures(run_dir, Path(args.cifar), known, args.probe_train_per_class)
        report["test_settings"] = {"probe_train_per_class": args.probe_train_per_class}
        out.write_text(json.dumps(report, indent=1) + "\n")
    section.write_text(render(report))
    print("\n".join(render_test(test, report["settings"]["epochs"], args.probe_train_per_class)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, from: {', '.join(LEVERS)}")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="/tmp/lever-screen", help="folder for the run directories")
    p.add_argument("--cache-dir", default=None, help="caption-feature cache shared by the runs")
    p.add_argument("--cifar-train", default=str(DATA / "cifar10" / "train"))
    p.add_argument("--cifar-per-class", type=int, default=200)
    p.add_argument("--rerun", action="store_true", help="run levers already in --out again")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lever-screen.json"))
    p.add_argument("--section", default=str(ROOT / "bench" / "sections" / "levers.md"))
    p.add_argument("--cifar", default=str(DATA / "cifar10"), help="CIFAR-10 train/ and test/ for --test")
    p.add_argument("--probe-train-per-class", type=int, default=1000, help="linear-probe training images")
    p.add_argument("--title", default=None, help="the section's heading (default: the file's own, or TITLE)")
    p.add_argument("--render-only", action="store_true", help="rewrite the section from --out's JSON")
    p.add_argument(
        "--test",
        action="store_true",
        help="add the screened runs' test figures (after the choice); no training",
    )
    args = p.parse_args(argv)
    out, section = Path(args.out), Path(args.section)
    if args.render_only:
        section.write_text(render(json.loads(out.read_text())))
        return 0
    if args.test:
        return add_test_figures(out, section, args)
    unknown = [n for n in args.levers.split(",") if n not in LEVERS]
    if unknown:
        p.error(f"unknown levers {unknown}; known: {', '.join(LEVERS)}")
    report: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"results": {}, "failed": {}}
    settings = {k: getattr(args, k) for k in ("epochs", "seed", "cifar_per_class")}
    if report.get("settings", settings) != settings:
        p.error(f"{out} holds a screen with other settings ({report['settings']}); pass another --out")
    machine = {**cpu_info(), "cores": os.cpu_count()}
    if not same_machine(report.get("machine", machine), machine):
        why = f"{out} was screened on another kind of CPU ({report['machine']}): its speeds would not compare"
        p.error(why + " with this one's; pass another --out")
    report.update(
        command=".venv/bin/python bench/screen_levers.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        machine=machine,
        settings=settings,
        title=args.title or report.get("title", TITLE),  # a file keeps its heading when --title is not given
    )
    for lever in args.levers.split(","):
        if lever in report["results"] and not args.rerun:
            print(f"== {lever}: already screened, skipped (--rerun to run it again)", flush=True)
            continue
        print(f"== {lever}", flush=True)
        try:
            report["results"][lever] = screen_one(lever, args)
            report["failed"].pop(lever, None)
        except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
            report["failed"][lever] = str(exc)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)
        section.write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
