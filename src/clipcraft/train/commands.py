"""``clipcraft train``: a thin command over :func:`clipcraft.train.train`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from clipcraft.errors import ClipcraftError
from clipcraft.train.config import add_runtime_flags


def register(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "train",
        help="train a CLIP model on image-caption data",
        description="Train from a YAML/JSON config plus key=value overrides (any TrainConfig field, by its "
        "flat name: epochs=2, lr_heads=1e-3, precision=fp32). Flags override --config; KEY=VALUE overrides "
        "override both.",
        epilog="Examples:\n"
        "  clipcraft train --config configs/flickr8k-minilm-vit-tiny.yaml\n"
        "  clipcraft train --config configs/flickr8k-minilm-vit-tiny.yaml epochs=1 batch_size=32 --output-dir runs/x\n"
        "  clipcraft train --config configs/seed.yaml --device cuda:1 --precision fp32\n"
        "  clipcraft train --resume runs/x\n"
        "  clipcraft train --init hf:openai/clip-vit-base-patch32 --data photos.csv --output-dir runs/mine\n"
        "  clipcraft train --data 'shards/{000000..000099}.tar' train_num_samples=100000 resampled=true\n"
        "  clipcraft train --data 'a/{000..009}.tar::b/{000..029}.tar' --data-weights 1,3 train_num_samples=50000\n"
        "  torchrun --nproc_per_node 2 -m clipcraft.cli train --config C.yaml   # data parallel",
        formatter_class=formatter,
    )
    p.add_argument("--config", default=None, help="YAML or JSON file of TrainConfig fields")
    p.add_argument(
        "--data",
        default=None,
        help="dataset path (overrides the config's data); WebDataset shards are streamed: a brace pattern "
        "'shards/{000000..000099}.tar', a glob, a pipe: command, an fsspec URL, several joined by '::'",
    )
    p.add_argument(
        "--data-format",
        default=None,
        help="flickr | table | coco | imagefolder | webdataset (default: detect)",
    )
    p.add_argument(
        "--data-weights",
        default=None,
        help="resampled streams: how often each '::' source is drawn, e.g. 1,3 (sets resampled=true)",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="start from an existing model instead of `model`: a saved clipcraft directory, a transformers "
        "CLIP/SigLIP directory, hf:ID or open_clip:ARCH,checkpoint=FILE",
    )
    add_runtime_flags(p)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. epochs=3 or model_overrides.embed_dim=512 (one entry of a mapping field)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from clipcraft.train import train
    from clipcraft.train.config import TrainConfig, gather_config

    flags = {
        key: getattr(args, key)
        for key in ("data", "data_format", "output_dir", "device", "precision", "init")
    }
    if args.data_weights is not None:
        try:
            flags["data_weights"] = [float(w) for w in args.data_weights.split(",")]
        except ValueError:
            raise ClipcraftError(
                f"--data-weights takes numbers like 1,3; got {args.data_weights!r}."
            ) from None
        flags["resampled"] = True
    config = TrainConfig.from_dict(gather_config(args.resume, args.config, flags, args.overrides))
    try:
        result = train(config, resume=args.resume)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank is interrupted: one message
            print(_interrupted(Path(args.resume or config.run.output_dir), args), file=sys.stderr)
        return 130
    print(f"Run directory: {result.run_dir}")
    return 0


def _interrupted(run_dir: Path, args: argparse.Namespace) -> str:
    """What an interrupted run left in ``run_dir`` and the command that continues it (or starts it again)."""
    from clipcraft.flags import rerun_command
    from clipcraft.train.checkpoint import CHECKPOINT_FILE, load_checkpoint

    models = [str(run_dir / name) for name in ("last", "best") if (run_dir / name).is_dir()]
    saved = f"; models of finished epochs: {', '.join(models)}" if models else ""
    if not (run_dir / CHECKPOINT_FILE).is_file():
        return (
            f"\nInterrupted. No checkpoint was written yet in {run_dir}, so there is nothing to resume{saved}.\n"
            f"Start again with:\n  {rerun_command(args)}"
        )
    state = load_checkpoint(run_dir)["state"]
    return (
        f"\nInterrupted. Saved in {run_dir}: the checkpoint at step {state['step']} (epoch {state['epoch'] + 1}, "
        f"{state['batch']} batches into it){saved}. Steps after it are lost.\n"
        f"Continue exactly from there with:\n  clipcraft train --resume {run_dir}"
    )
