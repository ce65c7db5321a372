"""``clipcraft finetune``: a thin command over :func:`clipcraft.finetune.finetune`.

Registration imports nothing heavy: torch loads inside the command function.
"""

from __future__ import annotations

import argparse
from typing import Any

from clipcraft.errors import ClipcraftError
from clipcraft.train.config import DEVICE_HELP, PRECISION_HELP

EPILOG = """Examples:
  clipcraft finetune --model runs/flickr8k/best --train ../shared/data/cifar10/train \\
      --test ../shared/data/cifar10/test --output-dir runs/cifar10-ft
  clipcraft finetune --model M --train data/train --val data/val --output-dir OUT --epochs 5 --alphas 0,0.25,0.5,0.75,1
  clipcraft finetune --resume runs/cifar10-ft max_steps=null
  clipcraft classify --model runs/cifar10-ft photo.jpg        # uses the fine-tuned head
  clipcraft finetune --model hf:openai/clip-vit-base-patch32 --train photos/train --output-dir OUT \
      --method flyp lora_rank=8 lora_towers=both layer_decay=0.75 retention=../shared/data/flickr8k

Methods (--method): ce (default) trains a classifier head on the image embeddings with cross-entropy; flyp
trains both towers with the CLIP loss on class prompts as captions, and the classifier is the text tower's
class embeddings. lora_rank=R trains LoRA adapters (rank R, lora_alpha, lora_towers=image|text|both,
lora_targets) instead of the towers' weights; they are saved in OUT/adapters and merged into the saved model.
layer_decay=D < 1 gives block i of n in an unlocked tower the rate lr * D**(n - i). retention=DATA scores the
initial, fine-tuned and chosen models on a second data set (class folders: zero-shot top-1; image-caption
data: mean retrieval recall, retention_split=test). wise_keep=0.9 then chooses alpha among the mixtures that
keep at least 90% of the initial model's retention on retention_val_split (default dev), not the reported split.

The classifier head starts from the zero-shot text embeddings of the class names (step 0 = zero-shot
accuracy); the image tower and head then train (tower at the lower --lr-tower) with warmup + cosine and early
stopping on the validation split. Finally the best fine-tuned weights are mixed with the zero-shot weights
(with flyp or LoRA: the whole initial and fine-tuned models, both towers and heads),
(1 - alpha) * zero-shot + alpha * fine-tuned, for every alpha in --alphas; the mix with the best validation
top-1 is saved to OUT as a clipcraft model plus its classes (classifier.json, classifier.safetensors).
OUT also holds metrics.jsonl, config.yaml, checkpoint.pt and summary.json (val accuracy for every alpha,
and test top-1 of the zero-shot, fine-tuned and chosen weights).
"""

# flag -> FinetuneConfig field, for flags that map one to one
_FLAGS = {
    "model": "model",
    "train": "train",
    "val": "val",
    "test": "test",
    "output_dir": "output_dir",
    "val_fraction": "val_fraction",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr_tower": "lr_tower",
    "lr_head": "lr_head",
    "patience": "patience",
    "limit_per_class": "limit_per_class",
    "classnames": "classnames_file",
    "templates": "templates_file",
    "workers": "num_workers",
    "device": "device",
    "precision": "precision",
    "seed": "seed",
    "method": "method",
}


def register(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Add ``finetune`` to the ``clipcraft`` parser."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune an image classifier (cross-entropy or FLYP, optional LoRA) with weight-space ensembling",
        description="Fine-tune a saved model on a class-folder data set (one subfolder of images per class). "
        "Flags override --config; KEY=VALUE overrides (any FinetuneConfig field) override both.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="model to start from: a saved clipcraft directory, a transformers CLIP/SigLIP directory, hf:ID or "
        "open_clip:ARCH,checkpoint=FILE",
    )
    p.add_argument("--method", choices=["ce", "flyp"], default=None, help="ce (default) or flyp, see below")
    p.add_argument("--train", default=None, help="training class folder (or image,label CSV)")
    p.add_argument(
        "--val", default=None, help="validation class folder; default: carve --val-fraction of train"
    )
    p.add_argument("--test", default=None, help="test class folder, scored once at the end")
    p.add_argument(
        "--output-dir", default=None, help="run directory, then the fine-tuned model (same flag as train)"
    )
    p.add_argument("--out", dest="output_dir", default=None, help=argparse.SUPPRESS)  # deprecated alias
    p.add_argument("--val-fraction", type=float, default=None, help="share of train held out (default 0.1)")
    p.add_argument("--epochs", type=int, default=None, help="most epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 32)")
    p.add_argument(
        "--lr-tower", type=float, default=None, help="image tower + projection rate (default 1e-5)"
    )
    p.add_argument("--lr-head", type=float, default=None, help="classifier head rate (default 1e-3)")
    p.add_argument(
        "--patience", type=int, default=None, help="epochs without val gain before stopping (default 3)"
    )
    p.add_argument(
        "--alphas", default=None, help="comma-separated mixing coefficients in [0, 1] (default 0,0.1,...,1)"
    )
    p.add_argument(
        "--limit-per-class", type=int, default=None, help="first N images of each class, every split"
    )
    p.add_argument("--classnames", default=None, help="file mapping folder<TAB>readable name, one per line")
    p.add_argument("--templates", default=None, help="prompt templates, one per line with {}")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default 0)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None, help=PRECISION_HELP)
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the val split, data order and augmentation"
    )
    p.add_argument("--config", default=None, help="YAML or JSON file of FinetuneConfig fields")
    p.add_argument("--resume", default=None, metavar="OUT_DIR", help="continue the run in OUT_DIR exactly")
    p.add_argument("--overwrite", action="store_true", help="replace a run or model already in --output-dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. warmup_steps=20")
    p.set_defaults(func=_run)


def parse_alphas(text: str) -> list[float]:
    """``"0,0.5,1"`` -> [0.0, 0.5, 1.0]; :class:`ClipcraftError` for a part that is not a number."""
    values = []
    for part in (s.strip() for s in text.split(",")):
        if not part:
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise ClipcraftError(
                f"--alphas must be comma-separated numbers in [0, 1]; {part!r} is not one."
            ) from None
    return values


def _run(args: argparse.Namespace) -> int:
    from clipcraft.finetune.config import FinetuneConfig
    from clipcraft.train.config import gather_config

    flags = {key: getattr(args, flag) for flag, key in _FLAGS.items()}
    flags["alphas"] = parse_alphas(args.alphas) if args.alphas is not None else None
    flags["overwrite"] = True if args.overwrite else None
    data = gather_config(args.resume, args.config, flags, args.overrides)
    if args.resume is None and (not data.get("model") or not data.get("train") or not data.get("output_dir")):
        raise ClipcraftError(
            "Give --model MODEL_DIR, --train DIR and --output-dir OUT_DIR (or --resume OUT_DIR)."
        )
    config = FinetuneConfig.from_dict(data)
    config.check()  # bad values fail here, before torch loads

    from clipcraft.finetune.loop import finetune

    result = finetune(config, resume=args.resume)
    if not result.finished:
        print(
            f"Stopped after {result.steps} steps; continue with: clipcraft finetune --resume {result.output_dir}"
        )
        return 0
    _print_summary(result.summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    print("alpha  val top-1")
    for row in summary["wise"]:
        mark = "  <- saved" if row["alpha"] == summary["alpha"] else ""
        print(f"{row['alpha']:5.2f}  {row['top1']:.4f}{mark}")
    if summary["test"]:
        print("\ntest (" + str(summary["data"].get("num_test", "?")) + " images)  top-1   top-5")
        for name in ("zeroshot", "finetuned", "wise"):
            m = summary["test"][name]
            label = f"wise (alpha {summary['alpha']:g})" if name == "wise" else name
            print(f"{label:<22}{m['top1']:.4f}  {m['top5']:.4f}")
    if summary.get("retention"):
        kind = summary["retention"]["initial"]["kind"]
        print(
            f"\nretention ({kind}): "
            + ", ".join(f"{k} {v['score']:.4f}" for k, v in summary["retention"].items())
        )
    if "trainable_params" in summary:
        print(f"trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,}")
    print(f"\nSaved the fine-tuned classifier to {summary['output_dir']}")
