"""The ``clipcraft`` command line: a thin ``main(argv) -> int`` over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from clipcraft import __version__
from clipcraft.errors import ClipcraftError

# Feature packages add their own subcommands: each module has ``register(subparsers, formatter_class)``, which
# must stay light (no torch, FAISS or web imports at registration; import inside the command function).
COMMAND_MODULES: tuple[str, ...] = (
    "clipcraft.train.commands",
    "clipcraft.search.commands",
    "clipcraft.evaluation.commands",
    "clipcraft.export",
    "clipcraft.finetune.commands",
)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _cmd_presets(args: argparse.Namespace) -> int:
    from clipcraft.presets import PRESETS

    if args.json:
        print(json.dumps({n: p.config.to_dict() for n, p in sorted(PRESETS.items())}, indent=2))
        return 0
    width = max(len(n) for n in PRESETS)
    for name, preset in sorted(PRESETS.items()):
        cfg = preset.config
        print(
            f"{name:<{width}}  {cfg.image.name} + {cfg.text.name}, {cfg.head.kind} heads, {cfg.embed_dim}-d"
        )
        print(f"{'':<{width}}  {preset.description}")
    return 0


def _cmd_create(args: argparse.Namespace) -> int:
    from clipcraft.model import create_model

    pretrained = {"auto": None, "yes": True, "no": False}[args.pretrained]
    model = create_model(args.preset, pretrained=pretrained, image_checkpoint=args.image_checkpoint)
    path = model.save(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"Saved {args.preset} ({params / 1e6:.1f}M parameters) to {path}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from clipcraft.model import load

    model = load(args.model)
    if bool(args.images) == bool(args.texts):
        raise ClipcraftError("Pass image files or --text captions (one of them).")
    if args.images:
        vectors = model.encode_images(args.images, batch_size=args.batch_size, progress=True)
    else:
        vectors = model.encode_texts(args.texts, batch_size=args.batch_size)
    if args.out:
        np.save(args.out, vectors)
        print(f"Wrote {vectors.shape} float32 embeddings to {args.out}")
    else:
        np.savetxt(sys.stdout, vectors, fmt="%.6f")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.smoke:
        from clipcraft.demo import smoke

        result = smoke(out_dir=args.out, steps=args.steps)
        print(
            f"Trained the tiny preset for {result['steps']} steps on rendered scenes "
            f"in {result['train_seconds']:.1f} s: loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}"
        )
        print(
            f"Image->text recall@1 on the training scenes: {result['i2t_r1']:.3f} "
            f"(chance {result['chance_r1']:.3f})"
        )
        print(
            f"Saved to {result['model_dir']}; reloaded embeddings bit-identical: {result['reload_identical']}"
        )
        return 0 if result["reload_identical"] else 1

    from clipcraft.config import parse_override
    from clipcraft.demo import run_demo

    overrides = dict(parse_override(item) for item in args.overrides)
    r = run_demo(args.out, **overrides)
    chance = r["zeroshot_chance"]
    print(f"\nclipcraft demo finished in {r['seconds'] / 60:.1f} min.")
    print(
        f"Test retrieval ({r['test_images']} scenes): text->image R@1 {r['test_t2i_r1']:.3f} / R@5 "
        f"{r['test_t2i_r5']:.3f}, image->text R@1 {r['test_i2t_r1']:.3f} / R@5 {r['test_i2t_r5']:.3f} "
        f"(chance R@1 {1 / r['test_images']:.4f})"
    )
    print(
        f"Zero-shot colour+shape top-1: {r['zeroshot_seen_top1']:.3f} on pairs seen in training, "
        f"{r['zeroshot_heldout_top1']:.3f} on held-out pairs never seen together (chance {chance:.3f})"
    )
    print(f"Model: {r['model']}\nPlots and example sheet: {', '.join(r['figures'])}")
    print(f"All numbers: {r['run_dir']}/demo.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipcraft",
        description="Train, evaluate and use CLIP models built from pretrained image and text towers.",
        epilog="Examples:\n  clipcraft demo\n  clipcraft presets\n  clipcraft create --preset tiny --out tiny-model",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"clipcraft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "presets",
        help="list the named model presets",
        epilog="Example:\n  clipcraft presets --json",
        formatter_class=_Formatter,
    )
    p.add_argument("--json", action="store_true", help="print the full configs as JSON")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser(
        "create",
        help="build a model from a preset and save it",
        epilog="Example:\n  clipcraft create --preset minilm-vit-tiny --out models/minilm-vit-tiny",
        formatter_class=_Formatter,
    )
    p.add_argument("--preset", required=True, help="preset name (see `clipcraft presets`)")
    p.add_argument("--out", required=True, help="directory to write the model to")
    p.add_argument(
        "--pretrained", choices=["auto", "yes", "no"], default="auto", help="pretrained tower weights"
    )
    p.add_argument("--image-checkpoint", default=None, help="local weights file for the image tower")
    p.set_defaults(func=_cmd_create)

    p = sub.add_parser(
        "embed",
        help="embed images or captions with a saved model",
        epilog="Examples:\n  clipcraft embed --model M photo1.jpg photo2.png --out emb.npy\n"
        '  clipcraft embed --model M --text "a dog" --text "a cat"',
        formatter_class=_Formatter,
    )
    p.add_argument("--model", required=True, help="saved model directory")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--text", dest="texts", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help=".npy file to write (default: print)")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser(
        "demo",
        help="train a small CLIP on generated scenes, evaluate it, offline (a few minutes)",
        epilog="Examples:\n  clipcraft demo --out runs/demo\n  clipcraft demo epochs=2\n  clipcraft demo --smoke",
        formatter_class=_Formatter,
    )
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument(
        "--smoke", action="store_true", help="a 30-second check instead: tiny preset, no training loop"
    )
    p.add_argument("--steps", type=int, default=60, help="training steps of --smoke")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="training config overrides, e.g. epochs=2"
    )
    p.set_defaults(func=_cmd_demo)

    for module_name in COMMAND_MODULES:
        import importlib

        importlib.import_module(module_name).register(sub, _Formatter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except ClipcraftError as exc:
        print(f"clipcraft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
