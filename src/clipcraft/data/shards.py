"""Writing WebDataset tar shards from any source clipcraft reads, with the ``webdataset`` library's TarWriter.

``write_shards(src, out)`` reads a Flickr folder, a CSV/JSONL table, a COCO file or an image folder (see
:func:`clipcraft.data.open_dataset`) and writes ``out/shard-000000.tar``, ``shard-000001.tar``, … plus
``out/manifest.json``. Record ``i`` of the source (an image with all of its captions) goes to shard
``i // samples_per_shard`` as one sample whose key is ``i`` zero-padded to 9 digits, with three members:

- ``jpg`` / ``png`` / ``webp``: the image file's bytes as they are (re-encoded as JPEG, quality 95, when the
  file is another format or ``resize`` is given: then the shorter side is scaled down to ``resize`` pixels);
- ``txt``: the first caption (what other WebDataset tools read);
- ``json``: ``{"captions": [all captions], "path": source file, "record": i}``.

Bad rows never stop a conversion: rows the reader refused while indexing and images that do not decode are
counted and listed in the manifest with their reasons (kind, file, reason), and the shard is written without
them. The manifest records per shard the samples, captions, bytes and sha256 checksum, and the settings.

Idempotent: every shard is written to a temporary name and renamed when complete, and the manifest is
rewritten after each shard. Running the command again skips the shards the manifest lists whose file is
present with the recorded size (a killed job redoes only its unfinished shards). A manifest written with other
settings (source, split, samples per shard, resize) is refused rather than mixed with.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipcraft.data.dataset import CaptionDataset
from clipcraft.data.report import BadDataReport
from clipcraft.errors import ClipcraftError
from clipcraft.files import atomic_file
from clipcraft.images import BadImageError, decode_image

MANIFEST = "manifest.json"
SHARDS_FORMAT = "clipcraft-shards"
SHARDS_FORMAT_VERSION = 1
SHARD_NAME = "shard-{:06d}.tar"
KEY_WIDTH = 9
_KEPT_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # suffix -> member name
MAX_BAD_LISTED = 10_000  # the manifest lists at most this many bad rows (all are counted)


@dataclass
class ShardInfo:
    """One finished shard: its file name, samples (images), captions, size in bytes and sha256 of the file."""

    name: str
    samples: int
    captions: int
    bytes: int
    sha256: str
    first_record: int  # source records [first_record, first_record + samples_per_shard) were its candidates


@dataclass
class ShardManifest:
    """What ``out/manifest.json`` holds; ``bad`` lists (kind, where, reason) of rows left out."""

    source: str
    source_format: str
    split: str
    samples_per_shard: int
    resize: int | None
    records: int  # records (images) in the source after its index report
    shards: list[ShardInfo] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)  # BadDataReport.to_dict() of all rows
    seconds: float = 0.0

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def pattern(self) -> str:
        """A brace pattern naming every shard, relative to the manifest's folder."""
        n = len(self.shards)
        return SHARD_NAME.format(0) if n == 1 else "shard-{000000.." + f"{n - 1:06d}" + "}.tar"

    def settings(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "split": self.split,
            "samples_per_shard": self.samples_per_shard,
            "resize": self.resize,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SHARDS_FORMAT,
            "format_version": SHARDS_FORMAT_VERSION,
            **asdict(self),
            "num_shards": len(self.shards),
            "num_samples": self.num_samples,
            "pattern": self.pattern,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardManifest:
        keys = {f for f in cls.__dataclass_fields__}
        manifest = cls(**{k: v for k, v in data.items() if k in keys and k != "shards"})
        manifest.shards = [ShardInfo(**s) for s in data.get("shards", [])]
        return manifest


def read_manifest(folder: str | os.PathLike[str]) -> ShardManifest | None:
    """The shard manifest in ``folder``, or None when there is none. Raises :class:`ClipcraftError` when the
    file is not a clipcraft shard manifest."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ClipcraftError(f"{path} is not valid JSON: {exc}") from exc
    if data.get("format") != SHARDS_FORMAT:
        raise ClipcraftError(f"{path} is not a clipcraft shard manifest (format {data.get('format')!r}).")
    return ShardManifest.from_dict(data)


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _image_member(path: str, resize: int | None) -> tuple[str, bytes]:
    """(member extension, bytes) of the image at ``path``: the file as it is when it is JPEG/PNG/WebP and no
    resize is asked, else a JPEG. Raises :class:`BadImageError` when the image does not decode."""
    image = decode_image(path)  # checks every image, also those copied as they are
    suffix = Path(path).suffix.lower()
    if resize is None and suffix in _KEPT_AS_IS:
        return _KEPT_AS_IS[suffix], Path(path).read_bytes()
    if resize is not None and min(image.size) > resize:
        scale = resize / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        from PIL import Image

        image = image.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return "jpg", buf.getvalue()


def write_shards(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    samples_per_shard: int = 1000,
    resize: int | None = None,
    data_format: str | None = None,
    split: str = "all",
    data_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ShardManifest:
    """Convert the dataset at ``source`` into WebDataset shards in ``out`` (see the module docstring).

    ``progress(done, total)`` is called after each shard. Returns the manifest, also written to
    ``out/manifest.json``. Raises :class:`ClipcraftError` for a WebDataset source (already shards), a bad
    ``samples_per_shard``/``resize``, or a manifest in ``out`` written with other settings.
    """
    import webdataset as wds

    from clipcraft.data.detect import detect_format, open_dataset

    if samples_per_shard < 1:
        raise ClipcraftError(f"--samples-per-shard must be at least 1, got {samples_per_shard}.")
    if resize is not None and resize < 8:
        raise ClipcraftError(f"--resize must be at least 8 pixels, got {resize}.")
    start = time.perf_counter()
    fmt = data_format or detect_format(source)
    dataset = open_dataset(source, fmt, split, **(data_options or {}))
    if not isinstance(dataset, CaptionDataset):
        raise ClipcraftError(
            f"{os.fspath(source)} is WebDataset shards already; there is nothing to convert."
        )
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    records = dataset.records
    manifest = ShardManifest(
        source=str(Path(source).resolve()),
        source_format=dataset.format or fmt,
        split=split,
        samples_per_shard=samples_per_shard,
        resize=resize,
        records=len(records),
    )
    old = read_manifest(target)
    done: dict[str, ShardInfo] = {}
    old_bad: dict[str, list[dict[str, str]]] = {}
    if old is not None:
        if old.settings() != manifest.settings():
            raise ClipcraftError(
                f"{target} holds shards written with other settings ({old.settings()}, now "
                f"{manifest.settings()}). Write to another --out, or delete {target} first."
            )
        for info in old.shards:
            path = target / info.name
            if path.is_file() and path.stat().st_size == info.bytes:
                done[info.name] = info
        for bad in old.bad:
            old_bad.setdefault(bad.get("shard", ""), []).append(bad)

    report = dataset.report.copy()  # rows refused while the source was indexed
    bad_rows = [
        {"kind": e.kind, "where": e.where, "reason": e.reason, "shard": ""} for e in dataset.report.examples
    ]
    num_shards = max(1, -(-len(records) // samples_per_shard))
    for number in range(num_shards):
        name = SHARD_NAME.format(number)
        first = number * samples_per_shard
        chunk = records[first : first + samples_per_shard]
        if name in done:  # finished by an earlier run: keep it and what it reported
            manifest.shards.append(done[name])
            report.seen(done[name].captions)
            for bad in old_bad.get(name, []):
                report.seen(int(bad.get("rows", 1)))
                report.add(bad["kind"], bad["where"], bad["reason"], rows=int(bad.get("rows", 1)))
                bad_rows.append(bad)
            continue
        samples = captions = 0
        with atomic_file(target / name) as fh:
            # a fixed integer mtime: the same input gives the same bytes, and no PAX header per member
            writer = wds.TarWriter(fh, mtime=0)
            for offset, record in enumerate(chunk):
                index = first + offset
                report.seen(len(record.captions))
                try:
                    ext, data = _image_member(record.image, resize)
                except BadImageError as exc:
                    report.add(exc.kind, exc.where, exc.reason, rows=len(record.captions))
                    bad_rows.append(
                        {
                            "kind": exc.kind,
                            "where": exc.where,
                            "reason": exc.reason,
                            "shard": name,
                            "rows": str(len(record.captions)),
                        }
                    )
                    continue
                meta = {"captions": list(record.captions), "path": record.image, "record": index}
                writer.write(
                    {
                        "__key__": f"{index:0{KEY_WIDTH}d}",
                        ext: data,
                        "txt": record.captions[0].encode("utf-8"),
                        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                    }
                )
                samples += 1
                captions += len(record.captions)
            writer.close()
        path = target / name
        manifest.shards.append(
            ShardInfo(name, samples, captions, path.stat().st_size, sha256_of(path), first)
        )
        _save(target, manifest, bad_rows, report, start)  # a killed run keeps every finished shard
        if progress is not None:
            progress(number + 1, num_shards)
    _save(target, manifest, bad_rows, report, start)
    return manifest


def _save(
    target: Path, manifest: ShardManifest, bad: list[dict[str, str]], report: BadDataReport, start: float
) -> None:
    manifest.bad = bad[:MAX_BAD_LISTED]
    manifest.report = report.to_dict()
    manifest.seconds = round(time.perf_counter() - start, 3)
    with atomic_file(target / MANIFEST) as fh:
        fh.write((json.dumps(manifest.to_dict(), indent=1) + "\n").encode("utf-8"))
