"""The search index on disk, its incremental build, and queries by text or image.

An index directory holds::

    manifest.json            format, model identity, precision, collection root, index settings, build report
    files.json               the indexed files: relative path, size, mtime (row i <-> embeddings row i)
    embeddings.npy           (N, D) float32 unit image embeddings
    index.faiss              the FAISS index over them (exact, IVF or HNSW)
    captions.json            optional captions for image->text search
    caption_embeddings.npy   (C, D) float32 unit text embeddings
    image_captions.json      optional: each file's own captions (relative path -> captions), when the
                             caption file names images (a CSV with image and caption columns)

A build writes the new directory beside the old one and renames it into place, so the index on disk is always
complete. Embeddings computed so far are also saved, batch by batch, in ``.<name>.partial/`` beside the index,
so an interrupted build continues where it stopped when it is run again.

Precision: images and captions of one index are embedded in one precision (``fp32`` unless asked), recorded
in the manifest and part of what makes embeddings reusable; queries are embedded in the index's precision.
Indexes written before the precision was recorded are read as ``fp32``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from clipcraft.data.folder import FileEntry, scan_folder
from clipcraft.digests import model_identity
from clipcraft.encoding import with_settings
from clipcraft.errors import ClipcraftError
from clipcraft.files import atomic_dir, atomic_file
from clipcraft.images import IMAGE_EXTENSIONS, ImageInput
from clipcraft.precision import INFERENCE_DEFAULT, Precision, resolve_precision
from clipcraft.search.ann import IndexConfig, build_faiss, import_faiss, set_search_params
from clipcraft.search.collection import match_image_captions, read_captions, read_image_captions

__all__ = [
    "BuildReport",
    "CaptionResult",
    "Index",
    "IndexConfig",
    "SearchResult",
    "build_index",
    "saved_by_interrupted_build",
]

INDEX_FORMAT = "clipcraft-index"
INDEX_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = "files.json"
EMBEDDINGS = "embeddings.npy"
FAISS_FILE = "index.faiss"
CAPTIONS = "captions.json"
CAPTION_EMBEDDINGS = "caption_embeddings.npy"
IMAGE_CAPTIONS = "image_captions.json"
SLOW_FAISS_BUILD = 20_000  # from this many images the FAISS build gets a line of progress
MAX_SKIPPED_LISTED = 1000  # the report lists at most this many unreadable files (all are counted)


class SearchResult(NamedTuple):
    """One image hit: absolute file path and cosine similarity (higher = closer)."""

    path: str
    score: float


class CaptionResult(NamedTuple):
    """One caption hit for image->text search."""

    caption: str
    score: float


@dataclass
class BuildReport:
    """What one ``build_index`` run did. Counts are files; ``skipped`` lists (relative path, reason)."""

    index_dir: str
    total: int = 0  # images in the index after the build
    embedded: int = 0  # embedded in this run
    reused: int = 0  # unchanged files whose embeddings were kept (from the old index or an interrupted run)
    removed: int = 0  # files in the old index that are no longer on disk (deleted, renamed or moved)
    changed: int = 0  # files still on disk whose size or modification time changed (re-embedded)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files, not indexed
    skipped_count: int = 0
    hidden: list[str] = field(
        default_factory=list
    )  # hidden files and folders skipped (names starting with ".")
    hidden_count: int = 0
    captions: int = 0
    precision: str = "fp32"  # what images and captions were embedded in (queries use it too)
    index: dict[str, Any] = field(default_factory=dict)  # kind and tuned parameters
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"Index {self.index_dir}: {self.total} images ({self.embedded} embedded, {self.reused} reused, "
            f"{self.removed} removed, {self.changed} changed), {self.captions} captions, "
            f"{self.index.get('kind', '?')} index, "
            f"{self.precision}, {self.seconds:.1f} s.",
        ]
        if self.skipped_count:
            lines.append(f"Skipped {self.skipped_count} unreadable file(s):")
            lines += [f"  {p}: {reason}" for p, reason in self.skipped[:20]]
            if self.skipped_count > 20:
                lines.append(f"  ... and {self.skipped_count - 20} more (see {MANIFEST}).")
        if self.hidden_count:
            shown = ", ".join(self.hidden[:5]) + (" ..." if self.hidden_count > 5 else "")
            lines.append(
                f"{self.hidden_count} hidden file(s) or folder(s) skipped (names starting with '.'): {shown}"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Writing helpers


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _load_model(model: Any, device: Any = "cpu") -> Any:
    if isinstance(model, (str, os.PathLike)):
        from clipcraft.model import load

        net = load(model, device=device)
        net.source_dir = str(Path(model).resolve())  # recorded in the index so searches can reload it
        return net
    return model


class _Partial:
    """Embeddings saved batch by batch during a build, so an interrupted build can continue.

    Lives in ``.<index name>.partial/`` beside the index; each saved batch is a ``.npz`` written under a
    temporary name and renamed, so a crash never leaves a half-written batch behind.
    """

    def __init__(self, out: Path, identity: str, root: str, precision: Precision) -> None:
        self.dir = out.parent / f".{out.name}.partial"
        state = {"identity": identity, "root": root, "precision": precision.value}
        state_file = self.dir / "state.json"
        if self.dir.is_dir():
            try:
                same = json.loads(state_file.read_text()) == state
            except (OSError, ValueError):
                same = False
            if not same:  # another model, folder or precision: what was saved is no use
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(state_file, state)
        self.count = len(list(self.dir.glob("batch-*.npz")))

    def load(self) -> dict[tuple[str, int, int], np.ndarray]:
        """(path, size, mtime_ns) -> embedding, for every file embedded by earlier, interrupted runs."""
        found: dict[tuple[str, int, int], np.ndarray] = {}
        for f in sorted(self.dir.glob("batch-*.npz")):
            try:
                with np.load(f) as z:
                    for p, s, m, e in zip(z["paths"], z["sizes"], z["mtimes"], z["embeddings"], strict=True):
                        found[(str(p), int(s), int(m))] = e
            except (OSError, ValueError, KeyError):
                continue  # unreadable leftovers are re-embedded
        return found

    def save(self, entries: list[FileEntry], embeddings: np.ndarray) -> None:
        if not entries:
            return
        with atomic_file(self.dir / f"batch-{self.count:06d}.npz") as fh:
            np.savez(
                fh,
                paths=np.array([e.path for e in entries]),
                sizes=np.array([e.size for e in entries], dtype=np.int64),
                mtimes=np.array([e.mtime_ns for e in entries], dtype=np.int64),
                embeddings=embeddings.astype(np.float32),
            )
        self.count += 1

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def saved_by_interrupted_build(out: str | os.PathLike[str]) -> tuple[Path, int]:
    """The folder where a build of ``out`` keeps its embeddings batch by batch, and how many images it holds
    (0 when there is none): what an interrupted build leaves for the next run of the same command."""
    folder = Path(out).parent / f".{Path(out).name}.partial"
    count = 0
    for f in folder.glob("batch-*.npz"):
        try:
            with np.load(f) as z:
                count += len(z["paths"])
        except (OSError, ValueError, KeyError):
            continue
    return folder, count


# ----------------------------------------------------------------------------------------------------------
# Build


def build_index(
    model: Any,
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    captions: str | os.PathLike[str] | None = None,
    config: IndexConfig | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    precision: str | Precision = INFERENCE_DEFAULT,
    device: Any = "cpu",
    progress: bool = False,
) -> BuildReport:
    """Embed every image under ``images`` and write (or update) the index directory ``out``.

    Args:
        model: a saved model directory or a loaded :class:`~clipcraft.model.ClipModel`.
        images: folder walked recursively for image files (see :func:`~clipcraft.data.folder.scan_folder`).
        captions: optional text file (one caption a line) or CSV (``caption`` column) for image->text search;
            without it the old index's captions are kept.
        config: how to index (exact below a size threshold, IVF or HNSW above; see :class:`IndexConfig`).
        batch_size / workers: the embedding loop (``workers`` loader processes).
        precision: ``fp32`` (default), ``bf16``, or ``auto`` (bf16 where the hardware has native bf16),
            resolved here once for the images and the captions, and recorded in the manifest.
        device: where a model given as a directory is loaded (a loaded model stays where it is).

    Incremental: when ``out`` holds an index from the same model, folder and precision, only files that are
    new or whose size or mtime changed are embedded; files no longer on disk are dropped. Unreadable files are skipped and
    listed in the report. Raises :class:`ClipcraftError` when ``out`` was built by a different model.
    """
    from clipcraft.encoding import EncodeSettings, encode_texts, iter_images

    start = time.perf_counter()
    config = config or IndexConfig()
    target = Path(out)
    root = Path(images).resolve()
    scan = scan_folder(root)
    entries = scan.entries
    if not entries:
        raise ClipcraftError(
            f"No image files under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case"
            + (f"; {len(scan.hidden)} hidden file(s) or folder(s) skipped" if scan.hidden else "")
            + "). Nothing was written."
        )
    caption_list = read_captions(captions) if captions is not None else None
    net = _load_model(model, device)
    identity = model_identity(net)
    settings = EncodeSettings(
        precision=resolve_precision(precision, net.device), batch_size=batch_size, workers=workers
    )
    report = BuildReport(
        index_dir=str(target),
        precision=settings.precision.value,
        hidden=scan.hidden[:MAX_SKIPPED_LISTED],
        hidden_count=len(scan.hidden),
    )

    # What can be reused: the previous index (same model, folder and precision), then an interrupted run's
    # batches. The reuse key is (model, folder, precision) + each file's (path, size, mtime).
    known: dict[tuple[str, int, int], np.ndarray] = {}
    old_captions: tuple[list[str], np.ndarray] | None = None
    old_files: dict[str, tuple[int, int]] = {}
    image_captions: dict[str, list[str]] = {}
    if (target / MANIFEST).is_file():
        old = Index.load(target, model=net, identity=identity)
        image_captions = old.image_captions if old.root == str(root) else {}
        if old.precision is settings.precision:
            old_captions = (old.captions, old.caption_embeddings) if old.captions else None
            if old.root == str(root):
                for e, row in zip(old.files, old.embeddings, strict=True):
                    known[(e.path, e.size, e.mtime_ns)] = row
        old_files = {e.path: (e.size, e.mtime_ns) for e in old.files} if old.root == str(root) else {}
    partial = _Partial(target, identity, str(root), settings.precision)
    known.update(partial.load())

    todo = [e for e in entries if (e.path, e.size, e.mtime_ns) not in known]
    on_disk = {e.path: (e.size, e.mtime_ns) for e in entries}
    report.removed = sum(path not in on_disk for path in old_files)
    report.changed = sum(path in on_disk and on_disk[path] != stamp for path, stamp in old_files.items())
    report.reused = len(entries) - len(todo)

    new: dict[tuple[str, int, int], np.ndarray] = {}
    skipped: dict[str, str] = {}
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="embedding images", unit="img")
    for batch in iter_images(net, [str(root / e.path) for e in todo], settings):
        done = [todo[p] for p in batch.positions]
        partial.save(done, batch.vectors)
        for e, row in zip(done, batch.vectors, strict=True):
            new[(e.path, e.size, e.mtime_ns)] = row
        for bad in batch.failed:
            skipped[todo[bad.index].path] = bad.reason
        if bar is not None:
            bar.update(len(batch.positions) + len(batch.failed))
    if bar is not None:
        bar.close()
    report.embedded = len(new)

    kept = [e for e in entries if e.path not in skipped]
    if caption_list is not None:
        image_captions = match_image_captions(read_image_captions(captions), [e.path for e in kept])  # type: ignore[arg-type]
    kept_paths = {e.path for e in kept}
    image_captions = {p: c for p, c in image_captions.items() if p in kept_paths}
    keys = [(e.path, e.size, e.mtime_ns) for e in kept]
    vectors = (
        np.stack([new[k] if k in new else known[k] for k in keys]).astype(np.float32)
        if keys
        else np.zeros((0, net.embed_dim), dtype=np.float32)
    )
    caption_rows: tuple[list[str], np.ndarray] | None = old_captions
    if caption_list is not None:
        if old_captions is not None and old_captions[0] == caption_list:
            caption_rows = old_captions
        else:
            text_settings = with_settings(settings, progress=progress)
            caption_rows = (caption_list, encode_texts(net, caption_list, text_settings).vectors)
    if progress and len(vectors) >= SLOW_FAISS_BUILD:  # IVF training and tuning take a while: say so
        print(f"building the search index over {len(vectors):,} embeddings ...", file=sys.stderr, flush=True)
    index, info = build_faiss(vectors.astype(np.float32), config)

    report.total = len(kept)
    report.skipped_count = len(skipped)
    report.skipped = sorted(skipped.items())[:MAX_SKIPPED_LISTED]
    report.captions = len(caption_rows[0]) if caption_rows else 0
    report.index = info
    report.seconds = time.perf_counter() - start
    _write_index_dir(
        target, net, identity, root, kept, vectors, index, info, config, caption_rows, image_captions, report
    )
    partial.remove()
    return report


def _write_index_dir(
    target: Path,
    model: Any,
    identity: str,
    root: Path,
    files: list[FileEntry],
    vectors: np.ndarray,
    index: Any,
    info: dict[str, Any],
    config: IndexConfig,
    captions: tuple[list[str], np.ndarray] | None,
    image_captions: dict[str, list[str]],
    report: BuildReport,
) -> None:
    faiss = import_faiss()
    source = getattr(model, "source_dir", None)
    manifest = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "model_identity": identity,
        "precision": report.precision,
        "model_dir": str(Path(source).resolve()) if source else None,
        "model_config": model.config.to_dict(),
        "embed_dim": int(model.embed_dim),
        "root": str(root),
        "count": len(files),
        "index": info,
        "index_config": config.to_dict(),
        "build": report.to_dict(),
    }
    with atomic_dir(target) as tmp:
        np.save(tmp / EMBEDDINGS, vectors.astype(np.float32))
        _write_json(tmp / FILES, [e.to_dict() for e in files])
        faiss.write_index(index, str(tmp / FAISS_FILE))
        if captions is not None:
            _write_json(tmp / CAPTIONS, captions[0])
            np.save(tmp / CAPTION_EMBEDDINGS, captions[1].astype(np.float32))
        if image_captions:
            _write_json(tmp / IMAGE_CAPTIONS, image_captions)
        _write_json(tmp / MANIFEST, manifest)


# ----------------------------------------------------------------------------------------------------------
# Search


class Index:
    """A built index, ready to search. Open one with :meth:`Index.load`.

    Attributes: ``root`` (the indexed folder), ``files`` (:class:`FileEntry` per row), ``embeddings`` (N, D)
    float32 unit rows, ``captions`` (list, maybe empty) and ``caption_embeddings`` (C, D), ``manifest``,
    ``image_captions`` (relative path -> that file's own captions; empty when the caption file named no images).
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        files: list[FileEntry],
        embeddings: np.ndarray,
        faiss_index: Any,
        captions: list[str],
        caption_embeddings: np.ndarray,
        model: Any = None,
        image_captions: dict[str, list[str]] | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.root = str(manifest["root"])
        self.files = files
        self.embeddings = embeddings
        self.faiss_index = faiss_index
        self.captions = captions
        self.caption_embeddings = caption_embeddings
        self.image_captions = image_captions or {}
        self._model = model

    def __len__(self) -> int:
        return len(self.files)

    @property
    def identity(self) -> str:
        return str(self.manifest["model_identity"])

    @property
    def precision(self) -> Precision:
        """What the index's images and captions were embedded in; queries are embedded in it too."""
        return Precision(self.manifest.get("precision", "fp32"))

    @property
    def paths(self) -> list[str]:
        """Absolute path of every indexed image, by row."""
        return [str(Path(self.root) / e.path) for e in self.files]

    def path_of(self, row: int) -> str:
        return str(Path(self.root) / self.files[row].path)

    def captions_of(self, row: int) -> list[str]:
        """The captions the caption file gave this image (empty when it gave none)."""
        return self.image_captions.get(self.files[row].path, [])

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: Any = None,
        *,
        identity: str | None = None,
    ) -> Index:
        """Open the index directory ``path``.

        ``model`` (a saved model directory or a loaded model) embeds the queries; it must be the model that
        built the index (same config and weights), else :class:`ClipcraftError`. Without it, the model
        directory recorded at build time is loaded when the first query needs it. ``identity`` skips
        recomputing the given model's digest when the caller already has it.
        """
        root = Path(path)
        manifest_file = root / MANIFEST
        if not manifest_file.is_file():
            raise ClipcraftError(
                f"{root} is not a clipcraft index ({MANIFEST} is missing). Build one with `clipcraft index build`."
            )
        try:
            manifest = json.loads(manifest_file.read_text())
        except ValueError as exc:
            raise ClipcraftError(f"{manifest_file} is not valid JSON: {exc}") from exc
        if manifest.get("format") != INDEX_FORMAT:
            raise ClipcraftError(f"{manifest_file} is not a clipcraft index manifest.")
        if manifest.get("layout") == "shards":  # built from embedding shards: opened memory-mapped
            from clipcraft.search.shard_index import load_shard_index

            index = load_shard_index(root, manifest)
            if model is not None:
                index.set_model(model, identity=identity)
            return index
        if int(manifest.get("format_version", 0)) > INDEX_FORMAT_VERSION:
            raise ClipcraftError(f"{root} was written by a newer clipcraft; upgrade clipcraft to read it.")
        faiss = import_faiss()
        files = [
            FileEntry(d["path"], int(d["size"]), int(d["mtime_ns"]))
            for d in json.loads((root / FILES).read_text())
        ]
        embeddings = np.load(root / EMBEDDINGS)
        faiss_index = faiss.read_index(str(root / FAISS_FILE))
        set_search_params(faiss_index, manifest.get("index", {}))
        captions: list[str] = []
        caption_embeddings = np.zeros((0, embeddings.shape[1]), dtype=np.float32)
        if (root / CAPTIONS).is_file():
            captions = json.loads((root / CAPTIONS).read_text())
            caption_embeddings = np.load(root / CAPTION_EMBEDDINGS)
        image_captions = {}
        if (root / IMAGE_CAPTIONS).is_file():
            image_captions = json.loads((root / IMAGE_CAPTIONS).read_text())
        if not (len(files) == embeddings.shape[0] == faiss_index.ntotal):
            raise ClipcraftError(
                f"{root} is inconsistent: {len(files)} files, {embeddings.shape[0]} embeddings, "
                f"{faiss_index.ntotal} indexed vectors. Rebuild it with `clipcraft index build`."
            )
        index = cls(
            root, manifest, files, embeddings, faiss_index, captions, caption_embeddings, None, image_captions
        )
        if model is not None:
            index.set_model(model, identity=identity)
        return index

    # -- the model that embeds queries ----------------------------------------------------------------------

    def set_model(self, model: Any, *, identity: str | None = None) -> None:
        """Use ``model`` (directory or loaded model) for queries; it must be the one that built the index."""
        net = _load_model(model)
        got = identity or model_identity(net)
        if got != self.identity:
            where = f" ({model})" if isinstance(model, (str, os.PathLike)) else ""
            raise ClipcraftError(
                f"The model{where} is not the model that built the index {self.path} "
                f"(model identity {got[:12]} vs the index's {self.identity[:12]}, built with "
                f"{self.manifest.get('model_dir') or 'an in-memory model'}). Search with the index's model, or "
                "rebuild the index with this model into a new folder."
            )
        self._model = net

    @property
    def model(self) -> Any:
        if self._model is None:
            model_dir = self.manifest.get("model_dir")
            if not model_dir or not Path(model_dir).is_dir():
                raise ClipcraftError(
                    f"The model that built {self.path} ({model_dir or 'in-memory'}) cannot be found; pass it: "
                    "Index.load(path, model=MODEL_DIR) or `--model MODEL_DIR`."
                )
            self.set_model(model_dir)
        return self._model

    # -- queries --------------------------------------------------------------------------------------------

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) unit query embeddings -> scores and row ids (Q, k'), k' = min(k, len(index)), best first.

        An approximate index may return fewer than k' hits for a query; missing slots hold id -1.
        """
        if k < 1:
            raise ClipcraftError(f"k must be >= 1, got {k}.")
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.embeddings.shape[1]:
            raise ClipcraftError(f"Queries must be (Q, {self.embeddings.shape[1]}); got {q.shape}.")
        k = min(k, len(self))
        if k == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        scores, ids = self.faiss_index.search(q, k)
        return scores, ids

    def _results(self, query: np.ndarray, k: int) -> list[SearchResult]:
        scores, ids = self.search_vectors(query, k)
        return [
            SearchResult(self.path_of(int(i)), float(s))
            for s, i in zip(scores[0], ids[0], strict=True)
            if i >= 0
        ]

    def embed_text(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise ClipcraftError("The text query is empty.")
        return self.model.encode_texts([text], precision=self.precision)  # (1, D), the index's precision

    def embed_image(self, image: ImageInput) -> np.ndarray:
        return self.model.encode_images([image], batch_size=1, precision=self.precision)  # (1, D)

    def search_text(self, text: str, k: int = 10) -> list[SearchResult]:
        """Text -> the ``k`` most similar indexed images as ``(path, score)``, best first."""
        return self._results(self.embed_text(text), k)

    def search_image(self, image: ImageInput, k: int = 10) -> list[SearchResult]:
        """Image (path or PIL image) -> the ``k`` most similar indexed images as ``(path, score)``, best first."""
        return self._results(self.embed_image(image), k)

    def search_captions(self, image: ImageInput, k: int = 10) -> list[CaptionResult]:
        """Image -> the ``k`` best captions of the index's caption set as ``(caption, score)``, best first.

        Exact search (caption sets are small). Raises :class:`ClipcraftError` when the index has no captions.
        """
        if not self.captions:
            raise ClipcraftError(f"{self.path} has no captions; build it with --captions FILE.")
        if k < 1:
            raise ClipcraftError(f"k must be >= 1, got {k}.")
        from clipcraft.search.ann import exact_search

        scores, ids = exact_search(self.caption_embeddings, self.embed_image(image), k)
        return [
            CaptionResult(self.captions[int(i)], float(s)) for s, i in zip(scores[0], ids[0], strict=True)
        ]
