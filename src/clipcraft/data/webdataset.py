"""Streaming WebDataset tar shards through the ``webdataset`` library: for reading, and for training.

Shard specs: a shard, a folder (its ``.tar``/``.tar.gz`` files, sorted), a brace pattern
(``shards/{000000..000099}.tar``, expanded by the library's ``braceexpand``), a local glob (``shards/*.tar``),
a ``pipe:`` command (``pipe:curl -s https://host/s-000001.tar``), an ``http(s)://`` URL (the library's
``gopen``), or any other fsspec URL (``s3://``, ``gs://``, ``hf://``, ``file://``…; the protocol's fsspec
package must be installed). Several sources are joined with ``::`` (``a/{..}.tar::b/{..}.tar``).

A shard's members are grouped into samples by key (the path up to the first dot of the file name) by the
library's ``tar_file_expander``/``group_by_keys``. A sample needs an image member (``jpg``, ``jpeg``, ``png``
or ``webp``) and a caption: the ``json`` member's ``captions`` list when there is one (what
``clipcraft data shards`` writes: then one caption per sample per epoch is drawn from (seed, epoch, sample),
and a step that takes k captions per image gets that one and the sample's next ones), else the ``txt`` member.

:class:`WebDatasetStream` reads every sample once per epoch: the shard list is shuffled with (seed, epoch) and
dealt out to the (rank, worker) pairs, pair ``rank * num_workers + worker`` reading shards ``p, p + R*W, …``.
:class:`ShardBatches` is what the training loop streams: batches of ``batch_size`` samples, a fixed number of
them per epoch on every rank, split over DataLoader workers (batch ``b`` of an epoch comes from worker
``b % W``), either from the shard list in epoch order (wrapping around to the start of the worker's shards
when they run out before the rank's quota, so some samples repeat within an epoch) or *resampled*: every
worker draws shards with replacement, a source with probability proportional to its weight, then a shard
uniformly within it, from a generator seeded with (seed, epoch, rank, worker).

Resume: everything a worker yields is a function of (seed, epoch, rank, worker, position), and every batch
holds ``batch_size`` stream samples (bad ones dropped and counted after). So the checkpoint records the
stream state (seed, epoch, batches and samples seen, ranks and workers) and a resumed run rebuilds each
worker's stream and skips the samples it had delivered, before decoding them: the batches that follow are
the same, bit for bit, in both modes. The skip re-reads (without decoding) the samples already seen in the
current epoch. Resuming with another number of ranks or workers is refused (the split would differ).

What the library does not do, done here: it groups members and opens streams but does not count bad data,
so a ``handler`` collects its exceptions per shard and they come out as :class:`BadItem` (``missing_file``,
``bad_shard``, plus ``incomplete_sample``, ``bad_encoding``, ``empty_caption``, ``unreadable_image`` and
``too_large`` found when a sample is read); its ``gopen`` has no generic fsspec fallback (an unknown scheme is
an error there), so other URLs are opened with fsspec; it does not glob or list folders; and its
``ResampledShards`` seeds from (rank*1000 + worker, epoch, seed) with no weights per source, so the
resampled mode draws shards itself from a seeded generator that the resume can rebuild.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipcraft.data.dataset import CaptionItem, ImageTransform, TextTransform
from clipcraft.data.decode import CHECK_MODES, BadImageError, CheckMode, check_image, decode_image
from clipcraft.data.report import (
    BAD_ENCODING,
    BAD_SHARD,
    EMPTY_CAPTION,
    INCOMPLETE_SAMPLE,
    MISSING_FILE,
    BadDataReport,
    BadItem,
)
from clipcraft.digests import files_digest, json_digest
from clipcraft.distributed import rank_and_world_size
from clipcraft.errors import ClipcraftError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # tried in this order when a sample has several
TEXT_EXT = "txt"
META_EXT = "json"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_BRACE = re.compile(r"\{([^{}]*)\}")
_SHARD_ID_BITS = 32  # sample id = shard number << 32 | position of the sample in its shard
_GOPEN_SCHEMES = ("pipe", "http", "https", "sftp", "ftps", "scp")  # opened by webdataset.gopen


def _wds() -> Any:
    try:
        import webdataset
    except ImportError:
        raise ClipcraftError(
            "WebDataset shards need the webdataset library: run `pip install 'clipcraft[shards]'` "
            "(or `pip install webdataset`)."
        ) from None
    return webdataset


def is_brace_pattern(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``{a..b}`` range or ``{x,y}`` list to expand."""
    return any(".." in m or "," in m for m in _BRACE.findall(str(path)))


def _scheme(text: str) -> str:
    match = _SCHEME.match(text)
    return match.group(1).lower() if match and len(match.group(1)) > 1 else ""  # "C:" is a drive letter


def is_shard_spec(path: str | os.PathLike) -> bool:
    """Whether ``path`` names shards by itself: several sources (``::``), a brace pattern, a ``pipe:``
    command or a URL, or a glob of tar files."""
    text = os.fspath(path)
    if "::" in text or is_brace_pattern(text) or _scheme(text):
        return True
    return any(c in text for c in "*?[") and _is_shard_name(text)


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero-padded like the start) and ``{a,b}`` lists, with the library's
    ``braceexpand``: ``s-{0..1}-{a,b}`` → ``s-0-a, s-0-b, s-1-a, s-1-b``."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def split_sources(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The ``::``-separated sources of a shard spec (a list is taken as one source per item)."""
    if isinstance(spec, (list, tuple)):
        return [os.fspath(s) for s in spec]
    return [s for s in os.fspath(spec).split("::") if s]  # type: ignore[arg-type]


def list_shards(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The shard URLs named by ``path`` (see the module docstring), sources joined by ``::`` in order.

    Local names are returned as given (a missing shard of a brace pattern is kept and counted when read).
    Raises :class:`ClipcraftError` when a local source matches nothing.
    """
    if isinstance(path, (list, tuple)):
        return [shard for item in path for shard in list_shards(item)]
    out: list[str] = []
    for source in split_sources(path):
        if _scheme(source):
            shards = expand_braces(source)  # pipe: commands and URLs: the library opens them
        elif is_brace_pattern(source):
            shards = expand_braces(source)
        elif any(c in source for c in "*?["):
            shards = sorted(glob.glob(source))
        elif Path(source).is_dir():
            shards = [
                str(p) for p in sorted(Path(source).iterdir()) if p.is_file() and _is_shard_name(p.name)
            ]
        elif Path(source).is_file():
            shards = [source]
        else:
            raise ClipcraftError(f"WebDataset shards not found: {source}")
        if not shards:
            raise ClipcraftError(f"No .tar shards in {source}.")
        out.extend(shards)
    return out


def _open(url: str) -> Any:
    """A readable binary stream of ``url``: local files, ``pipe:`` and http(s) through the library's gopen,
    other schemes through fsspec."""
    scheme = _scheme(url)
    if scheme in ("", *_GOPEN_SCHEMES):
        return _wds().gopen(url, "rb")
    try:
        import fsspec
    except ImportError:
        raise ClipcraftError(f"{url}: opening {scheme}:// URLs needs fsspec: `pip install fsspec`.") from None
    return fsspec.open(url, "rb").open()


@dataclass
class RawSample:
    """A complete sample as stored: its id, where it came from (``shard:key``), image bytes, and captions."""

    sample_id: int
    where: str
    image: bytes
    captions: tuple[str, ...]


def _sample_from_members(sample_id: int, where: str, members: dict[str, Any]) -> RawSample | BadItem:
    image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
    captions: tuple[str, ...] | None = None
    if META_EXT in members:
        try:
            meta = json.loads(members[META_EXT])
            if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
                captions = tuple(str(c).strip() for c in meta["captions"])
        except (ValueError, UnicodeDecodeError):
            pass  # not clipcraft's metadata: fall back to the txt member
    if image_ext is None or (captions is None and TEXT_EXT not in members):
        missing = " and ".join(
            what
            for what, absent in (
                ("an image member", image_ext is None),
                ("a txt member", captions is None and TEXT_EXT not in members),
            )
            if absent
        )
        return BadItem(sample_id, INCOMPLETE_SAMPLE, where, f"sample has no {missing}")
    if captions is None:
        try:
            captions = (members[TEXT_EXT].decode("utf-8").lstrip("\ufeff").strip(),)
        except UnicodeDecodeError as exc:
            return BadItem(sample_id, BAD_ENCODING, where, f"caption is not valid UTF-8 ({exc.reason})")
    captions = tuple(c for c in captions if c)
    if not captions:
        return BadItem(sample_id, EMPTY_CAPTION, where, "caption is empty")
    return RawSample(sample_id, where, members[image_ext], captions)


def iter_shard(url: str, shard_number: int = 0) -> Iterator[RawSample | BadItem]:
    """Stream the samples of one shard in stored order through the library; problems come out as
    :class:`BadItem` (never raised): a shard that cannot be opened (``missing_file``), one that is not a tar
    or ends early (``bad_shard``, counted once; the rest of the shard is lost).

    ``sample_id`` is ``shard_number << 32 | position``, stable across runs for a fixed shard list.
    """
    wds = _wds()
    try:
        stream = _open(url)
    except FileNotFoundError:
        yield BadItem(-1, MISSING_FILE, url, "shard file not found")
        return
    except (OSError, ValueError) as exc:
        yield BadItem(-1, MISSING_FILE, url, f"cannot open the shard: {exc}")
        return
    errors: list[BaseException] = []

    def collect(exn: BaseException) -> bool:
        errors.append(exn)
        return False  # stop reading this shard: what follows an error is not trustworthy

    base_id = shard_number << _SHARD_ID_BITS
    position = 0
    wanted = {*IMAGE_EXTS, TEXT_EXT, META_EXT}
    try:
        files = wds.tariterators.tar_file_expander(
            [{"url": url, "stream": stream}], handler=collect, eof_value=None
        )
        # After an error the library still hands over the sample it was grouping: complete when the error
        # came in the next sample's member, else it lacks a member and is counted as incomplete.
        for sample in wds.tariterators.group_by_keys(files, handler=collect):
            members = {k: v for k, v in sample.items() if k in wanted}
            yield _sample_from_members(base_id + position, f"{url}:{sample['__key__']}", members)
            position += 1
    finally:
        try:
            stream.close()
        except Exception as exc:  # a pipe: command that failed reports its exit status here
            errors.append(exc)
    if errors:
        yield BadItem(
            -1, BAD_SHARD, url, f"not a tar file or truncated after {position} samples: {errors[0]}"
        )


def _captions(sample: RawSample, seed: int, epoch: int, k: int = 1) -> tuple[str, ...]:
    """``k`` captions of ``sample`` for ``epoch``: the one drawn from (seed, epoch, sample id), then the
    sample's next ones, wrapping around its own count (a sample with fewer than k repeats them), as
    :meth:`clipcraft.train.features.FeatureCache.caption_rows` rotates the captions of map-style data."""
    count = len(sample.captions)
    first = 0 if count == 1 else hash((seed, epoch, sample.sample_id)) % count  # ints hash alike everywhere
    return tuple(sample.captions[(first + j) % count] for j in range(k))


def _shuffled(samples: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A buffer shuffle: keep ``size`` items, yield a random one as each new one arrives."""
    if size <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


class StreamItem(NamedTuple):
    """A streamed sample with the ``k`` captions a training step contrasts its image with (what a
    caption-keyed text feature cache looks up): the fields of :class:`CaptionItem`, then the captions and
    where the sample is stored (``shard:key``, for errors)."""

    image: Any
    caption: str  # the epoch's caption: captions[0]
    index: int  # the sample id
    captions: tuple[str, ...]  # the epoch's caption, then the sample's next ones, wrapping around
    where: str


class WebDatasetStream(IterableDataset):
    """Streams :class:`CaptionItem` ``(image, caption, sample_id)`` from tar shards, every sample once per
    epoch; bad samples as :class:`BadItem`. See the module docstring for how shards are split.

    ``rank``/``world_size`` default to torch.distributed's when it is initialized at iteration time, else 0/1.
    ``shuffle_buffer`` > 0 shuffles samples within a buffer of that size, seeded from (seed, epoch, rank, worker).
    ``step_captions=k`` yields :class:`StreamItem` with k captions per sample instead (the caption of a
    :class:`CaptionItem` is their first). Call :meth:`set_epoch` before each epoch (with persistent DataLoader
    workers the call does not reach the workers; re-create the iterator instead).
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        transform: ImageTransform | None = None,
        text_transform: TextTransform | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        step_captions: int | None = None,
    ) -> None:
        super().__init__()
        _wds()
        if step_captions is not None and step_captions < 1:
            raise ClipcraftError(f"step_captions must be at least 1, got {step_captions}.")
        self.sources = [list_shards(s) for s in split_sources(shards)]
        self.shards = [url for source in self.sources for url in source]
        self.source = (
            os.fspath(shards) if isinstance(shards, (str, os.PathLike)) else f"{len(self.shards)} shards"
        )
        self.format = "webdataset"
        self.transform = transform
        self.text_transform = text_transform
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.step_captions = step_captions
        self.epoch = 0
        self.report = BadDataReport(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order (and buffer shuffle) the next iteration uses."""
        self.epoch = epoch

    def placement(self) -> tuple[int, int, int, int]:
        """(rank, world size, worker, workers) of the calling process."""
        rank, world_size = rank_and_world_size(self.rank, self.world_size)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank, world_size, worker, workers

    def shard_order(self, epoch: int | None = None) -> list[int]:
        """Indices into :attr:`shards` in the order an epoch reads them (before dealing to ranks/workers)."""
        epoch = self.epoch if epoch is None else epoch
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return [int(i) for i in order]

    def my_shards(self) -> list[int]:
        """The shard indices this process (rank and DataLoader worker) reads in the current epoch."""
        rank, world, worker, workers = self.placement()
        consumer, consumers = rank * workers + worker, world * workers
        if len(self.shards) < consumers and consumer == 0:
            warnings.warn(
                f"{len(self.shards)} shards for {consumers} rank x worker pairs: some workers get no data. "
                "Use more shards or fewer workers.",
                stacklevel=2,
            )
        return self.shard_order()[consumer::consumers]

    def _rng(self, *tags: int) -> np.random.Generator:
        rank, _, worker, _ = self.placement()
        return np.random.default_rng([self.seed, self.epoch, rank, worker, *tags])

    def _raw(self) -> Iterator[RawSample | BadItem]:
        for i in self.my_shards():
            yield from iter_shard(self.shards[i], i)

    def _load(
        self, sample: RawSample | BadItem, seed: int | None = None
    ) -> CaptionItem | StreamItem | BadItem:
        """Decode, transform (with torch and Python RNGs seeded from ``seed`` when given) and caption."""
        self.report.seen()
        if isinstance(sample, BadItem):
            self.report.add_item(sample)
            return sample
        try:
            image = decode_image(sample.image, sample.where)
        except BadImageError as exc:
            bad = BadItem(sample.sample_id, exc.kind, exc.where, exc.reason)
            self.report.add_item(bad)
            return bad
        captions = _captions(sample, self.seed, self.epoch, self.step_captions or 1)
        if self.text_transform:
            captions = tuple(self.text_transform(c) for c in captions)
        if self.transform is None:
            pixels: Any = image
        elif seed is None:
            pixels = self.transform(image)
        else:
            py_state = random.getstate()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                pixels = self.transform(image)
            random.setstate(py_state)
        if self.step_captions is None:
            return CaptionItem(pixels, captions[0], sample.sample_id)
        return StreamItem(pixels, captions[0], sample.sample_id, captions, sample.where)

    def __iter__(self) -> Iterator[CaptionItem | StreamItem | BadItem]:
        for sample in _shuffled(self._raw(), self.shuffle_buffer, self._rng(1)):
            yield self._load(sample)

    def scan(self, check_images: CheckMode = "header") -> BadDataReport:
        """Read every shard (all of them, whatever the rank) and return a fresh report of what is bad,
        checking images as :func:`~clipcraft.data.decode.check_image` does for ``check_images``."""
        if check_images not in CHECK_MODES:
            raise ValueError(f"check_images must be one of {CHECK_MODES}, got {check_images!r}")
        report = BadDataReport(self.source)
        for number, shard in enumerate(self.shards):
            for sample in iter_shard(shard, number):
                report.seen()
                if isinstance(sample, BadItem):
                    report.add_item(sample)
                    continue
                if check_images != "none":
                    try:
                        check_image(sample.image, check_images, sample.where)
                    except BadImageError as exc:
                        report.add(exc.kind, exc.where, exc.reason)
        return report

    def all_captions(self) -> Iterator[tuple[str, ...]]:
        """The captions of every readable sample of every shard (all of them, whatever the rank), in shard
        order, decoding no image: what a caption-keyed text feature cache is built from. Bad samples are
        skipped here; training counts them where it meets them."""
        for number, shard in enumerate(self.shards):
            for sample in iter_shard(shard, number):
                if not isinstance(sample, BadItem):
                    yield sample.captions

    def digest(self) -> str:
        """sha256 naming the shards without reading them: each one's URL and, for local shards, the sha256
        their ``manifest.json`` records, else their size and modification time (a cache key's data part)."""
        checksums: dict[str, str] = {}
        for folder in {Path(s).parent for s in self.shards if not _scheme(s)}:
            entries = _manifest_entries(folder) or {}
            checksums.update({path: str(e.get("sha256", "")) for path, e in entries.items()})
        unrecorded = [s for s in self.shards if not _scheme(s) and not checksums.get(str(Path(s)))]
        return json_digest(
            {
                "shards": self.shards,
                "sha256": [checksums.get(str(Path(s)), "") for s in self.shards],
                "files": files_digest(unrecorded),
            }
        )

    def __repr__(self) -> str:
        return f"WebDatasetStream(shards={len(self.shards)}, source={self.source!r}, epoch={self.epoch})"


# -- training: fixed steps per epoch, resampling, weights, exact resume ------------------------------------


def shard_manifest_samples(spec: str | os.PathLike) -> int | None:
    """The number of samples ``clipcraft data shards`` recorded for the shards of ``spec``: the sum of the
    manifests beside each local source's shards, or None when a source has no manifest or names shards the
    manifest does not list."""
    total = 0
    for source in split_sources(spec):
        shards = list_shards(source)
        if any(_scheme(s) for s in shards):
            return None
        counts: dict[str, int] = {}
        for folder in {Path(s).parent for s in shards}:
            entries = _manifest_entries(folder)
            if entries is None:
                return None
            counts.update({path: int(entry["samples"]) for path, entry in entries.items()})
        if any(str(Path(s)) not in counts for s in shards):
            return None
        total += sum(counts[str(Path(s))] for s in shards)
    return total


def _manifest_entries(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The shards ``folder/manifest.json`` (written by ``clipcraft data shards``) lists, by path
    (``str(folder / name)``): their entries (samples, captions, bytes, sha256). None when it is missing or not JSON."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    return {str(folder / entry["name"]): entry for entry in data.get("shards", [])}


@dataclass(frozen=True)
class StreamPlan:
    """What an epoch of :class:`ShardBatches` delivers on each rank: ``steps`` batches of ``batch_size``."""

    steps: int
    batch_size: int
    world_size: int
    num_workers: int
    resampled: bool
    seed: int
    deterministic: bool = False  # every rank reads the whole stream and keeps its slice of each global batch
    rank: int = 0  # the slice kept in deterministic mode

    def worker_batches(self, worker: int, start_batch: int) -> tuple[int, int]:
        """(batches worker ``worker`` skips, batches it delivers) when the epoch starts at ``start_batch``."""
        workers = max(1, self.num_workers)
        total = len(range(worker, self.steps, workers))
        skipped = len(range(worker, start_batch, workers))
        return skipped, total - skipped

    def state(self, epoch: int, batch: int) -> dict[str, Any]:
        """The stream state a checkpoint records: with (seed, epoch, rank, worker) the shard generators are
        rebuilt; ``samples_seen`` (per rank) is what every rank's workers skip on resume."""
        return {
            "seed": self.seed,
            "epoch": epoch,
            "batches_seen": batch,
            "samples_seen": batch * self.batch_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "resampled": self.resampled,
            "deterministic": self.deterministic,
        }

    def check_resume(self, saved: dict[str, Any] | None) -> None:
        """Refuse to resume a stream with another split over ranks and workers (the data would differ)."""
        if not saved:
            return
        for key in ("world_size", "num_workers", "batch_size", "resampled", "deterministic"):
            if saved.get(key) != getattr(self, key):
                raise ClipcraftError(
                    f"The run streamed its shards with {key}={saved.get(key)}; resuming with {key}="
                    f"{getattr(self, key)} would not continue the same data. Resume with the same torchrun "
                    f"--nproc_per_node and {key}."
                )


class ShardBatches(IterableDataset):
    """Batches for the training loop: each item is ``(batch_number, [item | BadItem, ...])`` (items as the
    stream yields them: :class:`CaptionItem`, or :class:`StreamItem` with ``step_captions``) with
    exactly ``plan.batch_size`` samples, ``plan.steps`` batches per epoch on every rank (see the module
    docstring). Use with ``DataLoader(batch_size=None)``; batches may come out of order across workers when an
    epoch starts mid-way: :func:`in_order` puts them back.

    ``weights`` (one per ``::`` source, resampled mode only) set how often each source is drawn.

    ``plan.deterministic``: the stream must be the one of rank 0 of 1 (``WebDatasetStream(rank=0,
    world_size=1)``); every rank reads global batches of ``batch_size * world_size`` samples and keeps (and
    decodes) slice ``plan.rank``, so the global batches, and the losses, do not depend on the number of
    processes. It costs each rank the reading (not the decoding) of every sample: a mode for checks.
    Augmentation draws from torch and Python generators seeded per sample from (seed, epoch, rank, worker,
    position), so a sample gets the same crop however the run was interrupted.
    """

    def __init__(
        self,
        stream: WebDatasetStream,
        plan: StreamPlan,
        *,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.stream = stream
        self.plan = plan
        if weights is not None:
            if not plan.resampled:
                raise ClipcraftError(
                    "data_weights need resampled mode (resampled=true): set it or drop them."
                )
            if len(weights) != len(stream.sources) or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ClipcraftError(
                    f"data_weights needs one non-negative weight per '::' source ({len(stream.sources)}), "
                    f"not all zero; got {list(weights)}."
                )
        self.weights = (
            np.asarray(weights, dtype=np.float64) / float(sum(weights)) if weights is not None else None
        )
        self.start_batch = 0
        readers = 1 if plan.deterministic else plan.world_size
        if plan.deterministic and stream.placement()[:2] != (0, 1):
            raise ClipcraftError("A deterministic stream is read as rank 0 of 1 by every rank.")
        if not plan.resampled and len(stream.shards) < readers * max(1, plan.num_workers):
            raise ClipcraftError(
                f"{len(stream.shards)} shards for {readers} rank(s) x {max(1, plan.num_workers)} "
                "loader worker(s): every worker needs a shard of its own. Write more shards, use fewer "
                "workers, or train in resampled mode (resampled=true)."
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Stream ``epoch`` from batch ``start_batch`` (the batches before it are skipped, not decoded)."""
        if not 0 <= start_batch <= self.plan.steps:
            raise ClipcraftError(f"start_batch must be in [0, {self.plan.steps}], got {start_batch}.")
        self.stream.set_epoch(epoch)
        self.start_batch = start_batch

    def _shard_ids(self) -> Iterator[int]:
        """This worker's shard indices for the epoch: drawn with replacement (resampled), or its share of the
        epoch's order, over and over."""
        stream = self.stream
        if self.plan.resampled:
            rng = stream._rng(0)
            offsets = np.cumsum([0, *[len(s) for s in stream.sources]])
            while True:
                if self.weights is None:
                    yield int(rng.integers(len(stream.shards)))
                else:
                    source = int(rng.choice(len(stream.sources), p=self.weights))
                    yield int(offsets[source] + rng.integers(len(stream.sources[source])))
        mine = stream.my_shards()
        while True:
            yield from mine

    def _samples(self) -> Iterator[RawSample | BadItem]:
        seen = 0
        mine = len(self.stream.my_shards()) if not self.plan.resampled else 0
        for n, i in enumerate(self._shard_ids(), start=1):
            for sample in iter_shard(self.stream.shards[i], i):
                seen += 1
                yield sample
            if mine and n % mine == 0 and seen == 0:  # a whole pass over this worker's shards, empty
                raise ClipcraftError(
                    f"A worker's {mine} shard(s) hold no samples at all ({self.stream.source})."
                )

    def __iter__(self) -> Iterator[tuple[int, list[CaptionItem | StreamItem | BadItem]]]:
        stream, plan = self.stream, self.plan
        rank, _, worker, workers = stream.placement()
        if workers != max(1, plan.num_workers):
            raise ClipcraftError(f"ShardBatches planned for {plan.num_workers} workers runs in {workers}.")
        skip, count = plan.worker_batches(worker, self.start_batch)
        samples = _shuffled(self._samples(), stream.shuffle_buffer, stream._rng(1))
        size = plan.batch_size * (plan.world_size if plan.deterministic else 1)  # samples read per batch
        keep = (
            range(plan.rank * plan.batch_size, (plan.rank + 1) * plan.batch_size)
            if plan.deterministic
            else range(size)
        )
        for _ in range(skip * size):  # delivered before the checkpoint: read again, not decoded
            next(samples)
        position = skip * size
        for j in range(count):
            batch = []
            for slot in range(size):
                sample = next(samples)
                if slot in keep:
                    seed = hash((plan.seed, stream.epoch, rank, worker, position)) % (2**63)
                    batch.append(stream._load(sample, seed))
                position += 1
            yield worker + (skip + j) * workers, batch


def in_order(batches: Iterator[tuple[int, Any]], start: int) -> Iterator[Any]:
    """Yield the payloads of ``(number, payload)`` pairs in number order from ``start`` (holding at most as
    many as there are workers: a DataLoader takes one batch from each worker in turn)."""
    held: dict[int, Any] = {}
    expected = start
    for number, payload in batches:
        held[number] = payload
        while expected in held:
            yield held.pop(expected)
            expected += 1
    if held:
        raise ClipcraftError(f"Stream batches {sorted(held)} came without batch {expected}.")
