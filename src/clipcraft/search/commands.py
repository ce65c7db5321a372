"""CLI subcommands ``index build``, ``search`` and ``serve``.

Registration is light: torch, FAISS and the web server are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from clipcraft.errors import ClipcraftError
from clipcraft.flags import add_encoding, device_of, print_help_and_fail, rerun_command


def embed_shards(args: argparse.Namespace, source: str, out: str) -> Any:
    """Embed ``source`` into embedding shards in ``out`` on every rank of a torchrun job (or one process):
    the runtime joins the process group, each rank embeds its units, rank 0 writes the manifest."""
    from clipcraft.encoding import EncodeSettings
    from clipcraft.flags import load_model_arg
    from clipcraft.search.embedding_shards import embed_to_shards
    from clipcraft.train.runtime import open_runtime

    with open_runtime(args.device or "auto", args.precision) as rt:
        model = load_model_arg(args.model, rt.device)
        model.source_dir = args.model
        settings = EncodeSettings(
            precision=rt.precision, batch_size=args.batch_size, workers=args.workers, progress=False
        )
        report = embed_to_shards(
            model,
            source,
            out,
            settings=settings,
            shard_size=args.shard_size,
            dtype=args.dtype,
            rank=rt.rank,
            world_size=rt.world_size,
            barrier=rt.barrier,
        )
        for bad in report.failed[:20]:
            print(f"clipcraft: skipped {bad['where']}: {bad['reason']}", file=sys.stderr)
        print(
            f"rank {rt.rank}/{rt.world_size}: {report.embedded} unit(s) embedded ({report.vectors} vectors), "
            f"{report.reused} already done, of {report.units}; {len(report.failed)} input(s) skipped -> {out}",
            file=sys.stderr,
        )
        return rt, report


def _cmd_index_build(args: argparse.Namespace) -> int:
    from clipcraft.search.ann import IndexConfig
    from clipcraft.search.index import build_index, saved_by_interrupted_build

    config = IndexConfig(
        kind=args.kind, exact_threshold=args.exact_threshold, target_recall=args.target_recall
    )
    if args.embeddings or args.sharded:
        config.ivf_storage = args.storage
        return _index_from_shards(args, config)
    if args.storage != "sq8":
        raise ClipcraftError(
            f"--storage {args.storage} is for indexes built from embedding shards (--sharded or --embeddings)."
        )
    if not (args.model and args.images):
        raise ClipcraftError(
            "index build needs --model and --images (or --embeddings DIR of embedding shards)."
        )
    try:
        report = build_index(
            args.model,
            args.images,
            args.out,
            captions=args.captions,
            config=config,
            batch_size=args.batch_size,
            workers=args.workers,
            precision=args.precision,
            device=device_of(args.device),
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        folder, saved = saved_by_interrupted_build(args.out)
        kept = (
            "the index there is unchanged"
            if (Path(args.out) / "manifest.json").is_file()
            else "none written yet"
        )
        print(
            f"\nInterrupted. {saved} images embedded so far are saved in {folder} (index {args.out}: {kept}).\n"
            f"Run the same command again to continue where it stopped:\n  {rerun_command(args)}",
            file=sys.stderr,
        )
        return 130
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0


def _index_from_shards(args: argparse.Namespace, config: Any) -> int:
    """``--sharded``: embed into embedding shards under torchrun, then rank 0 builds; ``--embeddings``: build
    from shards made before (``clipcraft embed --source ... --out-dir ...``)."""
    import os

    from clipcraft.search.shard_index import build_index_from_shards

    embeddings = args.embeddings or f"{args.out.rstrip('/')}.embeddings"
    if args.sharded:
        if not (args.model and args.images):
            raise ClipcraftError("--sharded needs --model and --images (a folder, a .txt list or shards).")
        embed_shards(args, args.images, embeddings)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # rank 0 builds the index from every rank's shards
    manifest = build_index_from_shards(embeddings, args.out, config, progress=not args.quiet)
    if args.json:
        print(json.dumps(manifest))
    else:
        info = manifest["index"]
        print(
            f"Index {args.out}: {manifest['count']} vectors from {embeddings}, {info['kind']} index"
            + (f" (nlist {info['nlist']}, nprobe {info['nprobe']}, tuned recall@10 {info['tuned_recall_at_10']})"
               if info["kind"] == "ivf" else "")
            + f", {manifest['build']['seconds']:.1f} s."
        )  # fmt: skip
    return 0


def _print_table(rows: list[dict[str, Any]], key: str) -> None:
    if not rows:
        print("(no results)")
        return
    print(f"{'rank':>4}  {'score':>7}  {key}")
    for r in rows:
        print(f"{r['rank']:>4}  {r['score']:>7.4f}  {r[key]}")


def _cmd_search(args: argparse.Namespace) -> int:
    from clipcraft.search.index import Index

    if (args.text is None) == (args.image is None):
        raise ClipcraftError("Pass one query: --text TEXT or --image PATH.")
    if args.k < 1:
        raise ClipcraftError(f"-k must be >= 1, got {args.k}.")
    if args.captions and args.image is None:
        raise ClipcraftError("--captions searches captions by image: pass --image PATH.")
    index = Index.load(args.index, model=args.model)
    if args.captions:
        hits = index.search_captions(args.image, args.k)
        rows = [{"rank": i, "score": s, "caption": c} for i, (c, s) in enumerate(hits, start=1)]
        key = "caption"
    else:
        hits = (
            index.search_text(args.text, args.k)
            if args.text is not None
            else index.search_image(args.image, args.k)
        )
        rows = [{"rank": i, "score": s, "path": p} for i, (p, s) in enumerate(hits, start=1)]
        key = "path"
    if args.json:
        for row in rows:
            print(json.dumps({**row, "score": round(float(row["score"]), 6)}))
    else:
        _print_table(rows, key)
    if args.grid:
        if args.captions:
            raise ClipcraftError("--grid draws image results; it cannot be combined with --captions.")
        from clipcraft.search import sheet

        query = args.text if args.text is not None else args.image
        target = Path(args.grid)
        notes = []
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True)
            notes.append(f"created {target.parent}")
        if len(hits) > sheet.MAX_SHEET_RESULTS:
            notes.append(f"the sheet shows the first {sheet.MAX_SHEET_RESULTS} of {len(hits)} results")
        path = sheet.result_sheet(query, hits, target, query_is_text=args.text is not None)
        message = f"Wrote {path}" + (f" ({'; '.join(notes)})" if notes else "")
        print(message, file=sys.stderr if args.json else sys.stdout)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from clipcraft.server.app import serve
    except ImportError as exc:
        raise ClipcraftError(
            f"Serving needs the web extras ({exc.name} is missing): run `pip install 'clipcraft[server]'`."
        ) from None

    from clipcraft.templates import load_templates

    templates = load_templates(args.templates) if args.templates else None
    serve(
        args.index,
        host=args.host,
        port=args.port,
        model=args.model,
        templates=templates,
        thumb_dir=args.thumb_dir,
    )
    return 0


def register(subparsers: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add ``index``, ``search`` and ``serve`` to the ``clipcraft`` command line."""
    p = subparsers.add_parser(
        "index",
        help="build a search index over an image folder",
        epilog="Example:\n  clipcraft index build --model M --images photos/ --out photos.index",
        formatter_class=formatter_class,
    )
    index_sub = p.add_subparsers(dest="index_command", metavar="ACTION")
    p.set_defaults(func=lambda _args: print_help_and_fail(p))
    b = index_sub.add_parser(
        "build",
        help="embed every image under a folder and write (or update) an index",
        description="Embed every image under --images (recursively) and write the index to --out. Run it "
        "again to update: only new or changed files are embedded, deleted ones are dropped, and an "
        "interrupted build continues where it stopped.",
        epilog="Examples:\n  clipcraft index build --model models/seed --images photos/ --out photos.index\n"
        "  clipcraft index build --model M --images flickr8k/images --out f8k.index --captions captions.txt\n"
        "  torchrun --nproc_per_node 4 -m clipcraft.cli index build --sharded --model M --images big/ --out big.index\n"
        "  clipcraft index build --embeddings emb/ --out big.index        # from `clipcraft embed --out-dir emb/`",
        formatter_class=formatter_class,
    )
    b.add_argument("--model", default=None, help="saved model directory")
    b.add_argument(
        "--images",
        default=None,
        help="folder of images (walked recursively); with --sharded also a .txt list of paths or WebDataset shards",
    )
    b.add_argument("--out", required=True, help="index directory to write or update")
    b.add_argument(
        "--captions", default=None, help="text file (one caption a line) or CSV with a caption column"
    )
    b.add_argument("--kind", choices=["auto", "flat", "ivf", "hnsw"], default="auto", help="index type")
    b.add_argument(
        "--exact-threshold", type=int, default=50_000, help="auto: exact search below this many images"
    )
    b.add_argument(
        "--target-recall", type=float, default=0.98, help="approximate: tune search effort to this recall@10"
    )
    b.add_argument(
        "--sharded",
        action="store_true",
        help="embed into embedding shards (every torchrun rank a part, resumable per shard; in <out>.embeddings "
        "unless --embeddings), then build the index from them without loading them all (rank 0)",
    )
    b.add_argument(
        "--embeddings", default=None, help="folder of embedding shards (from `clipcraft embed --out-dir`)"
    )
    b.add_argument("--shard-size", type=int, default=10_000, help="--sharded: images per embedding shard")
    b.add_argument(
        "--storage",
        choices=["sq8", "pq", "pq4fs"],
        default="sq8",
        help="from shards, ivf: 8-bit codes (D bytes a vector), 8-bit product-quantizer codes (D/2 bytes) or "
        "4-bit product-quantizer codes scanned with SIMD (pq4fs: D/4 bytes, the fastest to build and search; "
        "for millions of vectors)",
    )
    b.add_argument(
        "--dtype", choices=["float16", "float32"], default="float16", help="--sharded: vector storage"
    )
    add_encoding(b)
    b.add_argument("--json", action="store_true", help="print the build report as JSON")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_index_build)

    s = subparsers.add_parser(
        "search",
        help="search an index by text or by image",
        epilog="Examples:\n"
        '  clipcraft search photos.index --text "a dog on the grass" -k 5\n'
        "  clipcraft search photos.index --image query.jpg --json\n"
        '  clipcraft search photos.index --text "a red car" --grid results.png\n'
        "  clipcraft search photos.index --image query.jpg --captions",
        formatter_class=formatter_class,
    )
    s.add_argument("index", help="index directory (from `clipcraft index build`)")
    s.add_argument("--text", default=None, help="text query")
    s.add_argument("--image", default=None, help="image query (a file)")
    s.add_argument("-k", "--top-k", dest="k", type=int, default=10, help="number of results")
    s.add_argument("--captions", action="store_true", help="image->text: rank the index's captions")
    s.add_argument("--json", action="store_true", help="JSON lines: rank, score, path (or caption)")
    s.add_argument("--grid", default=None, help="also write a PNG sheet of the query and its results")
    s.add_argument("--model", default=None, help="model directory (default: the one that built the index)")
    s.set_defaults(func=_cmd_search)

    v = subparsers.add_parser(
        "serve",
        help="serve a search page and JSON API for an index",
        description="Serve the search page (text or image queries, more like this, near-duplicate filter, "
        "zero-shot labels, a large view with captions) and its JSON API (docs at /docs), offline. Binds to "
        "this machine only unless --host says otherwise.",
        epilog="Examples:\n  clipcraft serve photos.index --port 8000   # then open http://127.0.0.1:8000/\n"
        "  clipcraft serve photos.index --templates prompts.txt   # zero-shot prompts, one per line with {}",
        formatter_class=formatter_class,
    )
    v.add_argument("index", help="index directory")
    v.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 127.0.0.1 is this machine only, 0.0.0.0 all"
    )
    v.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    v.add_argument("--model", default=None, help="model directory (default: the one that built the index)")
    v.add_argument(
        "--templates",
        default=None,
        help="zero-shot prompt templates file, one per line with {} (default: built-in)",
    )
    v.add_argument(
        "--thumb-dir",
        default=None,
        help="folder for cached thumbnails (default: .<index name>.thumbs beside the index)",
    )
    v.set_defaults(func=_cmd_serve)
