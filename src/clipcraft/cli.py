"""The ``clipcraft`` command line: a thin ``main(argv) -> int`` over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipcraft import __version__
from clipcraft.errors import ClipcraftError
from clipcraft.flags import (
    add_device,
    add_encoding,
    check_batch_size,
    device_of,
    load_model_arg,
    precision_of,
)

# Feature packages add their own subcommands: each module has ``register(subparsers, formatter_class)``, which
# must stay light (no torch, FAISS or web imports at registration; import inside the command function).
COMMAND_MODULES: tuple[str, ...] = (
    "clipcraft.data.commands",
    "clipcraft.train.commands",
    "clipcraft.search.commands",
    "clipcraft.evaluation.commands",
    "clipcraft.export",
    "clipcraft.finetune.commands",
)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written, and each flag's default shown once: argparse adds ``(default: X)``, except
    where there is nothing to show (no default, a switch that is off, a required flag); help texts for
    those say in words what happens without the flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.required:
            return action.help
        return super()._get_help_string(action)


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
    model = create_model(
        args.preset,
        pretrained=pretrained,
        image_checkpoint=args.image_checkpoint,
        device=device_of(args.device),
    )
    path = model.save(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"Saved {args.preset} ({params / 1e6:.1f}M parameters) to {path}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    if args.source is not None or args.out_dir is not None:  # embedding shards, under torchrun or not
        if not (args.source and args.out_dir) or args.images or args.texts:
            raise ClipcraftError(
                "Embedding shards take --source SRC and --out-dir DIR (and no files or --text)."
            )
        from clipcraft.search.commands import embed_shards

        _, report = embed_shards(args, args.source, args.out_dir)
        return 1 if report.failed else 0
    if bool(args.images) == bool(args.texts):
        raise ClipcraftError("Pass image files or --text captions (one of them).")
    check_batch_size(args)
    device = device_of(args.device)
    precision = precision_of(args, device)
    model = load_model_arg(args.model, device)
    failed = []
    kept = list(args.texts)
    if args.images:
        from clipcraft.encoding import EncodeSettings, encode_images

        settings = EncodeSettings(
            precision=precision, batch_size=args.batch_size, workers=args.workers, progress=True
        )
        encoded = encode_images(model, args.images, settings)  # bad files are skipped and reported
        vectors, failed = encoded.vectors, encoded.failed
        kept = [args.images[i] for i in encoded.kept]
        for bad in failed:
            print(f"clipcraft: skipped {bad.where}: {bad.reason}", file=sys.stderr)
    else:
        vectors = model.encode_texts(args.texts, batch_size=args.batch_size, precision=precision)
    if args.out:
        out = Path(args.out)
        np.save(out, vectors)
        rows = out.with_suffix(".paths.txt" if args.images else ".texts.txt")
        rows.write_text("".join(f"{item}\n" for item in kept))
        print(f"Wrote {vectors.shape} float32 embeddings ({precision}) to {out}, row names to {rows}")
    else:
        np.savetxt(sys.stdout, vectors, fmt="%.6f")
    return 1 if failed else 0


def _cmd_classify(args: argparse.Namespace) -> int:
    """Zero-shot against ``--labels``, or a fine-tuned model's own head; one precision for prompts and images."""
    import numpy as np

    from clipcraft.encoding import EncodeSettings, encode_images
    from clipcraft.evaluation.zeroshot import ZeroShotClassifier, load_templates

    if args.top_k < 1:
        raise ClipcraftError(f"--top-k must be >= 1; got {args.top_k}.")
    check_batch_size(args)
    device = device_of(args.device)
    precision = precision_of(args, device)
    classifier: Any
    if args.labels is None:  # the fine-tuned head of a `clipcraft finetune` output
        from clipcraft.finetune.classifier import has_classifier, load_classifier

        if not Path(args.model).is_dir():
            raise ClipcraftError(f"Model directory not found: {args.model}")
        if not has_classifier(args.model):
            raise ClipcraftError(
                f'{args.model} is not a fine-tuned classifier; give the classes with --labels "cat,dog,car" '
                "(or fine-tune one with `clipcraft finetune`)."
            )
        if args.templates:
            raise ClipcraftError(
                "--templates applies to zero-shot --labels; a fine-tuned head has no prompts."
            )
        classifier = load_classifier(args.model, device=device)
        model = classifier.model
        labels = classifier.classnames
    else:
        labels = [s.strip() for s in args.labels.split(",") if s.strip()]
        if not labels:
            raise ClipcraftError('--labels needs at least one class name, e.g. --labels "cat,dog,car".')
        if len(set(labels)) != len(labels):
            raise ClipcraftError(f"--labels repeats a class name: {labels}.")
        templates = load_templates(args.templates) if args.templates else None
        model = load_model_arg(args.model, device)
        classifier = ZeroShotClassifier(model, labels, templates, precision=precision)
    # Encoded here rather than by classifier.predict so that one unreadable file is reported, not fatal.
    settings = EncodeSettings(precision=precision, batch_size=args.batch_size, workers=args.workers)
    emb = encode_images(model, args.images, settings)
    for bad in emb.failed:
        print(f"clipcraft: skipped {bad.where}: {bad.reason}", file=sys.stderr)
    if emb.vectors.shape[0] == 0:
        raise ClipcraftError(f"None of the {len(args.images)} images could be read.")
    _, probs = classifier.predict_embeddings(emb.vectors)  # (N_ok, C)
    k = min(args.top_k, len(labels))
    for row, i in enumerate(emb.kept):
        order = np.argsort(-probs[row], kind="stable")[:k]
        top = [(labels[j], float(probs[row, j])) for j in order]
        if args.json:
            print(json.dumps({"image": args.images[i], "label": top[0][0], "top": [list(t) for t in top]}))
        else:
            print(f"{args.images[i]}\t" + "\t".join(f"{name} {p:.3f}" for name, p in top))
    return 0 if not emb.failed else 1


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
    p.add_argument(
        "--preset",
        required=True,
        help="preset name (see `clipcraft presets`), or a model to import: a transformers CLIP/SigLIP directory, hf:ID, open_clip:ARCH,checkpoint=FILE",
    )
    p.add_argument("--out", required=True, help="directory to write the model to")
    p.add_argument(
        "--pretrained", choices=["auto", "yes", "no"], default="auto", help="pretrained tower weights"
    )
    p.add_argument("--image-checkpoint", default=None, help="local weights file for the image tower")
    add_device(p)
    p.set_defaults(func=_cmd_create)

    p = sub.add_parser(
        "embed",
        help="embed images or captions with a saved model",
        epilog="Examples:\n  clipcraft embed --model M photo1.jpg photo2.png --out emb.npy\n"
        '  clipcraft embed --model M --text "a dog" --text "a cat"\n\n'
        "Images that cannot be read are skipped and named on stderr (exit code 1); with --out, the row names\n"
        "(image paths or texts, one a line) go to <out>.paths.txt or <out>.texts.txt beside the .npy file.\n\n"
        "Collections: --source SRC --out-dir DIR writes embedding shards (DIR/embeddings/*.npy, float16 or\n"
        "float32, DIR/metadata/*.parquet with key, path, caption), --shard-size images each; under torchrun\n"
        "every rank embeds its part; a rerun embeds only the shards not finished:\n"
        "  torchrun --nproc_per_node 2 -m clipcraft.cli embed --model M --source photos/ --out-dir emb/",
        formatter_class=_Formatter,
    )
    p.add_argument("--model", required=True, help="saved model directory")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--text", dest="texts", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--out", default=None, help=".npy file to write; default: print the vectors")
    p.add_argument(
        "--source",
        default=None,
        help="embed a folder, a .txt list of image paths or WebDataset shards into shards",
    )
    p.add_argument("--out-dir", default=None, help="with --source: the embedding-shards folder")
    p.add_argument("--shard-size", type=int, default=10_000, help="with --source: images per embedding shard")
    p.add_argument(
        "--dtype", choices=["float16", "float32"], default="float16", help="with --source: storage"
    )
    add_encoding(p, batch_size=32)
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

    p = sub.add_parser(
        "classify",
        help="classify images: zero-shot against class names, or with a fine-tuned model's own classes",
        epilog='Examples:\n  clipcraft classify --model M --labels "cat,dog,car" photo1.jpg photo2.png\n'
        "  clipcraft classify --model runs/cifar10-ft photo1.jpg     # a `clipcraft finetune` output\n\n"
        "Prints one line per image: the path, then the top-k classes with their probabilities. A model made\n"
        "by `clipcraft finetune` classifies with its fine-tuned head and classes unless --labels is given\n"
        "(then: zero-shot against those labels). Images that cannot be read are reported on stderr and\n"
        "skipped; the exit code is then 1.",
        formatter_class=_Formatter,
    )
    p.add_argument("--model", required=True, help="saved model directory")
    p.add_argument(
        "--labels",
        default=None,
        help="comma-separated class names, e.g. 'cat,dog,car'; required unless the model is fine-tuned",
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--templates", default=None, help="prompt templates file, one per line with {}")
    p.add_argument(
        "-k", "--top-k", dest="top_k", type=int, default=1, help="how many classes to show per image"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    add_encoding(p)
    p.set_defaults(func=_cmd_classify)

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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # so a command can print how to rerun itself
    try:
        return int(args.func(args))
    except ClipcraftError as exc:
        print(f"clipcraft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # commands with work to keep (train, index build) say more before this
        print("clipcraft: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
