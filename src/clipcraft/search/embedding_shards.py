"""Embedding shards: a collection embedded in parts, by every rank of a torchrun job, resumable per part.

``embed_to_shards(model, source, out)`` splits ``source`` into *units* and writes, for unit ``n``::

    out/embeddings/00000n.npy      (count, D) unit image embeddings, float16 or float32
    out/metadata/00000n.parquet    one row per vector: key, path, caption (null when there is none)
    out/done/00000n.json           written last: the unit is complete (count, inputs that failed and why)
    out/manifest.json              rank 0, at the end: model identity and directory, precision, dtype, D,
                                   the source, and every unit's count

Sources: a folder (every image under it, sorted by relative path, ``shard_size`` images a unit; key = the
relative path), a file list (``.txt``, one image path a line, optionally ``<TAB>caption``; relative paths are
relative to the list's folder; ``shard_size`` lines a unit; key = the line number), or WebDataset shards (any
spec :func:`clipcraft.data.webdataset.list_shards` takes; one unit per tar; key = the sample's key, caption =
its first caption).

Under torchrun rank ``r`` of ``R`` embeds units ``r, r + R, …``. A unit's vectors depend only on the unit
(not on the rank or the number of ranks), so R processes write what one would. Every file is written under a
temporary name and renamed, and the ``done`` marker comes last: a killed job, run again, embeds only the units
without a marker. A manifest from another model, precision, dtype, source or shard size is refused.
Images that cannot be read are skipped, counted and named in the unit's marker and the manifest.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipcraft.errors import ClipcraftError
from clipcraft.files import atomic_file

EMBEDDINGS_FORMAT = "clipcraft-embeddings"
EMBEDDINGS_DIR, METADATA_DIR, DONE_DIR = "embeddings", "metadata", "done"
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
MAX_FAILED_LISTED = 10_000


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ClipcraftError(
            "Embedding shards keep their metadata in parquet: `pip install 'clipcraft[search]'` (or pyarrow)."
        ) from None
    return pyarrow


@dataclass
class Unit:
    """One part of the source: ``items`` are (key, path, caption) of images to read (folders and lists), or
    ``url`` a WebDataset shard."""

    number: int
    items: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str | None = None

    @property
    def name(self) -> str:
        return f"{self.number:06d}"


def source_kind(source: str | os.PathLike[str]) -> str:
    """``folder``, ``list`` (a .txt file of paths) or ``webdataset``."""
    from clipcraft.data.webdataset import _is_shard_name, is_shard_spec

    text = os.fspath(source)
    if is_shard_spec(text) or _is_shard_name(text):
        return "webdataset"
    path = Path(text)
    if path.is_dir():
        if any(p.is_file() and _is_shard_name(p.name) for p in path.iterdir()):
            return "webdataset"
        return "folder"
    if path.is_file() and path.suffix.lower() == ".txt":
        return "list"
    raise ClipcraftError(
        f"{text}: not a folder, a .txt list of image paths or WebDataset shards; nothing to embed."
    )


def plan_units(source: str | os.PathLike[str], shard_size: int) -> tuple[str, list[Unit]]:
    """(kind, units) of ``source`` (see the module docstring). Raises :class:`ClipcraftError` when empty."""
    from clipcraft.data.folder import scan_folder
    from clipcraft.data.webdataset import list_shards

    if shard_size < 1:
        raise ClipcraftError(f"--shard-size must be at least 1, got {shard_size}.")
    kind = source_kind(source)
    if kind == "webdataset":
        return kind, [Unit(n, url=url) for n, url in enumerate(list_shards(os.fspath(source)))]
    items: list[tuple[str, str, str | None]] = []
    if kind == "folder":
        root = Path(source).resolve()
        items = [(e.path, str(root / e.path), None) for e in scan_folder(root).entries]
    else:
        base = Path(source).resolve().parent
        lines = Path(source).read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            path, _, caption = line.partition("\t")
            items.append((str(number), str(base / path.strip()), caption.strip() or None))
    if not items:
        raise ClipcraftError(f"No images in {os.fspath(source)}: nothing to embed.")
    units = [Unit(n, items[i : i + shard_size]) for n, i in enumerate(range(0, len(items), shard_size))]
    return kind, units


@dataclass
class EmbedReport:
    """What one call did: units embedded by this rank, reused (finished before), vectors and failures."""

    out: str
    units: int = 0
    embedded: int = 0  # units embedded by this process in this run
    reused: int = 0  # units this process found finished
    vectors: int = 0  # vectors in the units this process embedded
    failed: list[dict[str, str]] = field(default_factory=list)


def _write_unit(
    out: Path, unit: Unit, vectors: np.ndarray, rows: list[tuple[str, str, str | None]], failed: list[Any]
) -> None:
    pa = _pyarrow()
    with atomic_file(out / EMBEDDINGS_DIR / f"{unit.name}.npy") as fh:
        np.save(fh, vectors)
    table = pa.table(
        {
            "key": pa.array([r[0] for r in rows], pa.string()),
            "path": pa.array([r[1] for r in rows], pa.string()),
            "caption": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    buf = io.BytesIO()
    pa.parquet.write_table(table, buf)
    with atomic_file(out / METADATA_DIR / f"{unit.name}.parquet") as fh:
        fh.write(buf.getvalue())
    marker = {
        "count": int(vectors.shape[0]),
        "failed": failed[:MAX_FAILED_LISTED],
        "failed_count": len(failed),
    }
    with atomic_file(out / DONE_DIR / f"{unit.name}.json") as fh:
        fh.write(json.dumps(marker).encode("utf-8"))


def _unit_inputs(
    unit: Unit, chunk: int
) -> Iterator[tuple[list[Any], list[tuple[str, str, str | None]], list[Any]]]:
    """(images, their (key, path, caption) rows, failures) in chunks: paths for folders and lists; decoded
    PIL images for a WebDataset shard (read with the library, bad samples as failures)."""
    if unit.url is None:
        for i in range(0, len(unit.items), chunk):
            rows = unit.items[i : i + chunk]
            yield [r[1] for r in rows], rows, []
        return
    from clipcraft.data.report import BadItem
    from clipcraft.data.webdataset import iter_shard
    from clipcraft.images import BadImageError, decode_image

    images: list[Any] = []
    rows: list[tuple[str, str, str | None]] = []
    failed: list[Any] = []
    for sample in iter_shard(unit.url, unit.number):
        if isinstance(sample, BadItem):
            failed.append({"where": sample.where, "kind": sample.kind, "reason": sample.reason})
        else:
            try:
                images.append(decode_image(sample.image, sample.where))
                rows.append((sample.where.rsplit(":", 1)[-1], unit.url, sample.captions[0]))
            except BadImageError as exc:
                failed.append({"where": exc.where, "kind": exc.kind, "reason": exc.reason})
        if len(images) >= chunk:
            yield images, rows, failed
            images, rows, failed = [], [], []
    if images or failed:
        yield images, rows, failed


def embed_to_shards(
    model: Any,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    settings: Any,
    shard_size: int = 10_000,
    dtype: str = "float16",
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
    identity: str | None = None,
) -> EmbedReport:
    """Embed this rank's units of ``source`` into ``out`` (see the module docstring); rank 0 writes the
    manifest after ``barrier()`` (every rank must call this). ``settings`` is the
    :class:`~clipcraft.encoding.EncodeSettings` (precision resolved by the caller); ``dtype`` what the
    vectors are stored as. Returns this rank's :class:`EmbedReport`."""
    from clipcraft.digests import model_identity
    from clipcraft.encoding import encode_images

    if dtype not in DTYPES:
        raise ClipcraftError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    target = Path(out)
    kind, units = plan_units(source, shard_size)
    identity = identity or model_identity(model)
    source_id = os.fspath(source) if kind == "webdataset" else str(Path(source).resolve())
    settings_record = {
        "model_identity": identity,
        "precision": settings.precision.value,
        "dtype": dtype,
        "source": source_id,
        "kind": kind,
        "shard_size": shard_size,
    }
    old = read_manifest(target)
    if old is not None and {k: old.get(k) for k in settings_record} != settings_record:
        raise ClipcraftError(
            f"{target} holds embeddings made with other settings ({ {k: old.get(k) for k in settings_record} }); "
            "write to another folder or delete it first."
        )
    for folder in (EMBEDDINGS_DIR, METADATA_DIR, DONE_DIR):
        (target / folder).mkdir(parents=True, exist_ok=True)
    report = EmbedReport(str(target), units=len(units))
    for unit in units[rank::world_size]:
        if (target / DONE_DIR / f"{unit.name}.json").is_file() and (
            target / EMBEDDINGS_DIR / f"{unit.name}.npy"
        ).is_file():
            report.reused += 1
            continue
        parts: list[np.ndarray] = []
        rows: list[tuple[str, str, str | None]] = []
        failed: list[Any] = []
        for images, chunk_rows, chunk_failed in _unit_inputs(unit, max(256, settings.batch_size * 4)):
            failed.extend(chunk_failed)
            if not images:
                continue
            encoded = encode_images(model, images, settings)
            parts.append(encoded.vectors.astype(dtype))
            rows.extend(chunk_rows[i] for i in encoded.kept)
            failed.extend(
                {"where": chunk_rows[b.index][1], "kind": b.kind, "reason": b.reason} for b in encoded.failed
            )
        vectors = np.concatenate(parts) if parts else np.zeros((0, model.embed_dim), dtype=dtype)
        _write_unit(target, unit, vectors, rows, failed)
        report.embedded += 1
        report.vectors += int(vectors.shape[0])
        report.failed.extend(failed)
    if barrier is not None:
        barrier()
    if rank == 0:
        _write_manifest(target, model, units, settings_record)
    return report


def _write_manifest(target: Path, model: Any, units: list[Unit], record: dict[str, Any]) -> None:
    shards, failed, failed_count = [], [], 0
    for unit in units:
        marker = target / DONE_DIR / f"{unit.name}.json"
        if not marker.is_file():
            raise ClipcraftError(f"Unit {unit.name} of {target} is not finished: run the command again.")
        done = json.loads(marker.read_text())
        shards.append({"name": unit.name, "count": int(done["count"])})
        failed.extend(done["failed"])
        failed_count += int(done.get("failed_count", len(done["failed"])))
    source_dir = getattr(model, "source_dir", None)
    manifest = {
        "format": EMBEDDINGS_FORMAT,
        "format_version": 1,
        **record,
        "model_dir": str(Path(source_dir).resolve()) if source_dir else None,
        "model_config": model.config.to_dict(),
        "dim": int(model.embed_dim),
        "count": sum(s["count"] for s in shards),
        "shards": shards,
        "failed": failed[:MAX_FAILED_LISTED],
        "failed_count": failed_count,
    }
    with atomic_file(target / MANIFEST) as fh:
        fh.write((json.dumps(manifest, indent=1) + "\n").encode("utf-8"))


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The embedding-shards manifest of ``folder`` (None when absent); raises when it is something else."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != EMBEDDINGS_FORMAT:
        raise ClipcraftError(f"{path} is not a clipcraft embedding-shards manifest.")
    return data


def shard_files(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> list[tuple[Path, Path, int]]:
    """(vectors .npy, metadata .parquet, count) of every unit, in row order."""
    root = Path(folder)
    return [
        (
            root / EMBEDDINGS_DIR / f"{s['name']}.npy",
            root / METADATA_DIR / f"{s['name']}.parquet",
            int(s["count"]),
        )
        for s in manifest["shards"]
    ]


def write_arrays_as_shards(
    out: str | os.PathLike[str],
    parts: Any,
    *,
    dim: int,
    dtype: str = "float16",
    model_identity: str = "external",
    precision: str = "fp32",
    source: str = "external",
) -> dict[str, Any]:
    """Write vectors computed elsewhere as embedding shards (one per item of ``parts``: ``(vectors (n, dim),
    keys)``, keys as strings), with the manifest an index build reads. For imports and synthetic collections
    (tests, benchmarks); ``model_identity`` says whose vectors they are. Returns the manifest."""
    target = Path(out)
    for folder in (EMBEDDINGS_DIR, METADATA_DIR, DONE_DIR):
        (target / folder).mkdir(parents=True, exist_ok=True)
    units = []
    for number, (vectors, keys) in enumerate(parts):
        unit = Unit(number)
        rows = [(str(k), str(k), None) for k in keys]
        if len(rows) != len(vectors) or (len(vectors) and np.shape(vectors)[1] != dim):
            raise ClipcraftError(
                f"Part {number}: {np.shape(vectors)} vectors for {len(rows)} keys, dim {dim}."
            )
        _write_unit(target, unit, np.asarray(vectors, dtype=dtype), rows, [])
        units.append(unit)

    class _Model:  # what the manifest records of the model that made the vectors
        embed_dim = dim
        source_dir = None

        class config:  # noqa: N801
            @staticmethod
            def to_dict() -> dict[str, Any]:
                return {}

    record = {
        "model_identity": model_identity,
        "precision": precision,
        "dtype": dtype,
        "source": source,
        "kind": "arrays",
        "shard_size": 0,
    }
    _write_manifest(target, _Model(), units, record)
    manifest = read_manifest(target)
    assert manifest is not None
    return manifest
