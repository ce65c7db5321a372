"""The ``clipcraft eval`` and ``clipcraft classify`` subcommands.

Registration imports nothing heavy: torch, scikit-learn and matplotlib load inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from clipcraft.errors import ClipcraftError

EVAL_EPILOG = """Examples:
  clipcraft eval retrieval --model M --data ../shared/data/flickr8k --split test --out flickr8k.json
  clipcraft eval zeroshot --model M --data ../shared/data/cifar10/test --out cifar10-zs.json
  clipcraft eval linear-probe --model M --data ../shared/data/cifar10 --features pre --out cifar10-lp.json
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="saved model directory (from `clipcraft create` or training)"
    )
    p.add_argument("--out", default=None, help="JSON file to write the results to")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, else fp32"
    )
    p.add_argument("--device", default=None, help="torch device; None means cuda if available, else cpu")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image decoding processes; None means 0 for small sets, else CPUs/2 (at most 4)",
    )
    p.add_argument("--cache-dir", default=None, help="folder to cache embeddings in, reused by repeated runs")
    p.add_argument(
        "--metrics", default=None, help="comma-separated metric names to print (the JSON always has all)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add ``eval {retrieval,zeroshot,linear-probe}`` and ``classify`` to the ``clipcraft`` parser."""
    ev = subparsers.add_parser(
        "eval",
        help="evaluate a model: retrieval recall, zero-shot classification, linear probe",
        description="Evaluate a saved model; prints a table and, with --out, writes JSON.",
        epilog=EVAL_EPILOG,
        formatter_class=formatter_class,
    )
    tasks = ev.add_subparsers(dest="task", metavar="TASK")

    p = tasks.add_parser(
        "retrieval",
        help="image->text and text->image Recall@1/5/10 and ranks (any caption of an image is a hit)",
        epilog="Example:\n  clipcraft eval retrieval --model M --data ../shared/data/flickr8k --split test "
        "--out flickr8k-test.json --cache-dir .eval-cache",
        formatter_class=formatter_class,
    )
    _add_common(p)
    p.add_argument(
        "--data", required=True, help="caption dataset: Flickr folder, image folder, CSV/JSONL, COCO"
    )
    p.add_argument("--split", default=None, help="split to use; None means test for Flickr, all otherwise")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.set_defaults(func=_cmd_retrieval)

    p = tasks.add_parser(
        "zeroshot",
        help="zero-shot classification of a class-folder or image,label CSV data set",
        epilog="Example:\n  clipcraft eval zeroshot --model M --data ../shared/data/cifar10/test "
        "--out cifar10.json --confusion cifar10.png",
        formatter_class=formatter_class,
    )
    _add_common(p)
    p.add_argument(
        "--data", required=True, help="folder with one subfolder per class, or a CSV of image,label"
    )
    p.add_argument(
        "--split",
        default=None,
        help="read DATA/SPLIT; None means DATA, or DATA/test when DATA holds split folders",
    )
    p.add_argument("--classnames", default=None, help="file mapping folder<TAB>readable name, one per line")
    p.add_argument(
        "--templates",
        default=None,
        help="prompt templates, one per line with {}; None means the built-in set",
    )
    p.add_argument("--limit-per-class", type=int, default=None, help="use the first N images of each class")
    p.add_argument(
        "--confusion",
        default=None,
        help="confusion-matrix PNG; None means beside --out as <out>.confusion.png",
    )
    p.set_defaults(func=_cmd_zeroshot)

    p = tasks.add_parser(
        "linear-probe",
        help="logistic regression on frozen image vectors, L2 chosen on a validation split",
        epilog="Example:\n  clipcraft eval linear-probe --model M --data ../shared/data/cifar10 --features post "
        "--out cifar10-probe.json",
        formatter_class=formatter_class,
    )
    _add_common(p)
    p.add_argument("--data", default=None, help="folder holding train/ and test/ class folders")
    p.add_argument("--split", default=None, help="test split folder under DATA; None means test")
    p.add_argument("--train-data", default=None, help="training class folder or CSV (instead of DATA/train)")
    p.add_argument("--test-data", default=None, help="test class folder or CSV (instead of DATA/SPLIT)")
    p.add_argument("--classnames", default=None, help="file mapping folder<TAB>readable name")
    p.add_argument(
        "--features",
        choices=["post", "pre"],
        default="post",
        help="post: projected normalized embeddings; pre: image tower features before the projection head",
    )
    p.add_argument("--limit-per-class", type=int, default=None, help="use the first N images of each class")
    p.add_argument("--val-fraction", type=float, default=0.2, help="training share held out to choose L2")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.set_defaults(func=_cmd_linear_probe)

    ev.set_defaults(func=lambda args: _no_task(ev))

    p = subparsers.add_parser(
        "classify",
        help="classify images: zero-shot against class names, or with a fine-tuned model's own classes",
        epilog='Examples:\n  clipcraft classify --model M --labels "cat,dog,car" photo1.jpg photo2.png\n'
        "  clipcraft classify --model runs/cifar10-ft photo1.jpg     # a `clipcraft finetune` output\n\n"
        "Prints one line per image: the path, then the top-k classes with their probabilities. A model made\n"
        "by `clipcraft finetune` classifies with its fine-tuned head and classes unless --labels is given\n"
        "(then: zero-shot against those labels). Images that cannot be read are reported on stderr and\n"
        "skipped; the exit code is then 1.",
        formatter_class=formatter_class,
    )
    p.add_argument("--model", required=True, help="saved model directory")
    p.add_argument(
        "--labels",
        default=None,
        help="comma-separated class names, e.g. 'cat,dog,car'; required unless the model is fine-tuned",
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--templates", default=None, help="prompt templates file, one per line with {}")
    p.add_argument("--top-k", type=int, default=1, help="how many classes to show per image")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--device", default=None, help="torch device; None means cuda if available, else cpu")
    p.set_defaults(func=_cmd_classify)


def _no_task(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _load_model(path: str, device: str | None) -> Any:
    import torch

    from clipcraft.model import load

    if not Path(path).is_dir():
        raise ClipcraftError(f"Model directory not found: {path}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(path, device=device)


def _options(args: argparse.Namespace) -> Any:
    from clipcraft.evaluation.runners import EncodeOptions

    if args.batch_size < 1:
        raise ClipcraftError(f"--batch-size must be >= 1; got {args.batch_size}.")
    return EncodeOptions(
        batch_size=args.batch_size,
        precision=args.precision,
        workers=args.workers,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
    )


def _finish(task: str, result: dict[str, Any], args: argparse.Namespace) -> int:
    from clipcraft.evaluation.runners import format_table, select_metrics, write_json

    result["model"] = str(args.model)
    print(format_table(result, select_metrics(task, _metric_names(args.metrics))))
    if result.get("num_skipped"):
        print(
            f"Skipped {result['num_skipped']} image(s) that could not be decoded, e.g. {result['skipped'][0]['path']}"
        )
    if result.get("confusion_png"):
        print(f"Wrote the confusion matrix to {result['confusion_png']}")
    if args.out:
        print(f"Wrote {write_json(result, args.out)}")
    return 0


def _metric_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [n.strip() for n in text.split(",") if n.strip()]


def _check_metrics(task: str, args: argparse.Namespace) -> None:
    # Checked before any embedding is computed, so a typo costs nothing.
    from clipcraft.evaluation.runners import select_metrics

    select_metrics(task, _metric_names(args.metrics))


def _cmd_retrieval(args: argparse.Namespace) -> int:
    from clipcraft.evaluation.runners import evaluate_retrieval

    _check_metrics("retrieval", args)
    options = _options(args)
    model = _load_model(args.model, args.device)
    result = evaluate_retrieval(model, args.data, split=args.split, limit=args.limit, options=options)
    return _finish("retrieval", result, args)


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from clipcraft.evaluation.runners import evaluate_zeroshot

    _check_metrics("zeroshot", args)
    options = _options(args)
    confusion = args.confusion
    if confusion is None and args.out:
        confusion = str(Path(args.out).with_suffix("")) + ".confusion.png"
    model = _load_model(args.model, args.device)
    result = evaluate_zeroshot(
        model,
        args.data,
        split=args.split,
        classnames_file=args.classnames,
        templates_file=args.templates,
        limit_per_class=args.limit_per_class,
        confusion_png=confusion,
        options=options,
    )
    return _finish("zeroshot", result, args)


def _cmd_linear_probe(args: argparse.Namespace) -> int:
    from clipcraft.evaluation.runners import evaluate_linear_probe, resolve_probe_data

    _check_metrics("linear-probe", args)
    options = _options(args)
    train, test = resolve_probe_data(args.data, args.train_data, args.test_data, args.split)
    model = _load_model(args.model, args.device)
    result = evaluate_linear_probe(
        model,
        train,
        test,
        features=args.features,
        classnames_file=args.classnames,
        limit_per_class=args.limit_per_class,
        val_fraction=args.val_fraction,
        seed=args.seed,
        options=options,
    )
    return _finish("linear-probe", result, args)


def _cmd_classify(args: argparse.Namespace) -> int:
    import numpy as np

    from clipcraft.evaluation.embeddings import encode_image_files
    from clipcraft.evaluation.zeroshot import ZeroShotClassifier, load_templates

    if args.top_k < 1:
        raise ClipcraftError(f"--top-k must be >= 1; got {args.top_k}.")
    classifier: Any
    if args.labels is None:  # the fine-tuned head of a `clipcraft finetune` output
        import torch

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
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
        model = _load_model(args.model, args.device)
        classifier = ZeroShotClassifier(model, labels, templates)
    # Encoded here rather than by classifier.predict so that one unreadable file is reported, not fatal.
    emb = encode_image_files(model, args.images, workers=0)
    for path, reason in emb.failed:
        print(f"clipcraft: skipped {path}: {reason}", file=sys.stderr)
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
