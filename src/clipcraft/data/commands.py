"""``clipcraft data shards``: a thin command over :func:`clipcraft.data.shards.write_shards`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clipcraft.flags import print_help_and_fail


def register(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "data",
        help="prepare data sets (convert to WebDataset shards)",
        epilog="Example:\n  clipcraft data shards --data ../shared/data/flickr8k --split train --out shards/f8k-train",
        formatter_class=formatter,
    )
    actions = p.add_subparsers(dest="data_command", metavar="ACTION")
    p.set_defaults(func=lambda _args: print_help_and_fail(p))
    s = actions.add_parser(
        "shards",
        help="write WebDataset tar shards (image, all captions, key, source path) and a manifest",
        description="Convert any source clipcraft reads (Flickr folder, CSV/JSONL, COCO, image folder) into "
        "WebDataset tar shards written with the webdataset library, plus manifest.json: shards, sample counts, "
        "sha256 checksums, bad rows with reasons. Bad rows are counted and listed, never fatal; run it again "
        "after an interruption and finished shards are kept, not redone.",
        epilog="Examples:\n"
        "  clipcraft data shards --data ../shared/data/flickr8k --split train --out shards/f8k-train\n"
        "  clipcraft data shards --data pairs.csv --out shards/pairs --samples-per-shard 5000 --resize 256\n"
        "  clipcraft train --data 'shards/f8k-train/shard-{000000..000005}.tar' train_num_samples=6000",
        formatter_class=formatter,
    )
    s.add_argument("--data", required=True, help="source data set (format detected)")
    s.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    s.add_argument("--samples-per-shard", type=int, default=1000, help="images per shard")
    s.add_argument(
        "--resize", type=int, default=None, help="scale the shorter side down to S pixels (JPEG, quality 95)"
    )
    s.add_argument("--split", default="all", help="split of formats that have them (flickr: train/dev/test)")
    s.add_argument(
        "--data-format", default=None, help="flickr | table | coco | imagefolder (default: detect)"
    )
    s.add_argument("--json", action="store_true", help="print the manifest as JSON")
    s.set_defaults(func=_cmd_shards)


def _cmd_shards(args: argparse.Namespace) -> int:
    from clipcraft.data.shards import write_shards

    manifest = write_shards(
        args.data,
        args.out,
        samples_per_shard=args.samples_per_shard,
        resize=args.resize,
        data_format=args.data_format,
        split=args.split,
        progress=lambda done, total: print(f"\rshard {done}/{total}", end="", file=sys.stderr),
    )
    print("", file=sys.stderr)
    if args.json:
        print(json.dumps(manifest.to_dict()))
        return 0
    bad = manifest.report.get("bad", 0)
    print(
        f"Wrote {len(manifest.shards)} shard(s), {manifest.num_samples} samples, to {args.out} "
        f"({manifest.pattern}); {bad} bad row(s) left out, listed in {args.out}/manifest.json."
    )
    return 0
