"""The ``clipcraft eval`` subcommands (``classify``, which also reads fine-tuned heads, lives in the CLI).

Registration imports nothing heavy: torch, scikit-learn and matplotlib load inside the command functions.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipcraft.flags import (
    add_encoding,
    check_batch_size,
    device_of,
    load_model_arg,
    precision_of,
    print_help_and_fail,
)

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
    add_encoding(p)
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

    ev.set_defaults(func=lambda args: print_help_and_fail(ev))


def _prepare(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model on its device and the encoding settings: ``--precision`` resolved once, for images and
    texts alike."""
    from clipcraft.encoding import EncodeSettings

    check_batch_size(args)
    device = device_of(args.device)
    settings = EncodeSettings(
        precision=precision_of(args, device),
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.quiet,
    )
    return load_model_arg(args.model, device), settings


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
    model, settings = _prepare(args)
    result = evaluate_retrieval(
        model, args.data, split=args.split, limit=args.limit, settings=settings, cache_dir=args.cache_dir
    )
    return _finish("retrieval", result, args)


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from clipcraft.evaluation.runners import evaluate_zeroshot

    _check_metrics("zeroshot", args)
    confusion = args.confusion
    if confusion is None and args.out:
        confusion = str(Path(args.out).with_suffix("")) + ".confusion.png"
    model, settings = _prepare(args)
    result = evaluate_zeroshot(
        model,
        args.data,
        split=args.split,
        classnames_file=args.classnames,
        templates_file=args.templates,
        limit_per_class=args.limit_per_class,
        confusion_png=confusion,
        settings=settings,
        cache_dir=args.cache_dir,
    )
    return _finish("zeroshot", result, args)


def _cmd_linear_probe(args: argparse.Namespace) -> int:
    from clipcraft.evaluation.runners import evaluate_linear_probe, resolve_probe_data

    _check_metrics("linear-probe", args)
    train, test = resolve_probe_data(args.data, args.train_data, args.test_data, args.split)
    model, settings = _prepare(args)
    result = evaluate_linear_probe(
        model,
        train,
        test,
        features=args.features,
        classnames_file=args.classnames,
        limit_per_class=args.limit_per_class,
        val_fraction=args.val_fraction,
        seed=args.seed,
        settings=settings,
        cache_dir=args.cache_dir,
    )
    return _finish("linear-probe", result, args)
