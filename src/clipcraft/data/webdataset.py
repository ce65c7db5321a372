"""Streaming reader for WebDataset tar shards, with the standard library's :mod:`tarfile` (no extra package).

A shard is a ``.tar`` (or ``.tar.gz``) whose members are grouped into samples by key: the member path up to the
first dot of its file name (``0001.jpg`` and ``0001.txt`` form sample ``0001``). A sample needs one image member
(``jpg``, ``jpeg``, ``png`` or ``webp``) and a ``txt`` member holding the UTF-8 caption; other members are
ignored. The path given may be a single shard, a folder of shards, or a brace pattern such as
``shards-{000..009}.tar`` (also ``{a,b}``).

:class:`WebDatasetStream` is an ``IterableDataset``. Each epoch the shard list is shuffled with (seed, epoch) (the
same order on every rank), then dealt out to the (rank, worker) pairs: pair ``rank * num_workers + worker`` reads
shards ``p, p + R*W, p + 2*R*W, …``. So every shard is read exactly once per epoch by exactly one worker of one
rank. Ranks are not equalized: with unequal shards, or fewer shards than ``R*W``, ranks yield different numbers of
samples; a distributed training loop must cope (e.g. fixed steps per epoch).

Bad samples are yielded as :class:`~clipcraft.data.report.BadItem` (so that :func:`~clipcraft.data.collate`
drops them and their counts reach the main process) and counted in the stream's per-process ``report``: a missing
shard (``missing_file``), a shard that is not a tar or ends early (``bad_shard``, counted once, the rest of the
shard is lost), a sample without image or caption (``incomplete_sample``), a caption that is not UTF-8
(``bad_encoding``) or empty (``empty_caption``), and an image that does not decode (``unreadable_image``) or is
over the pixel limit (``too_large``).
"""

from __future__ import annotations

import glob
import os
import posixpath
import re
import tarfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
from clipcraft.distributed import rank_and_world_size
from clipcraft.errors import ClipcraftError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # tried in this order when a sample has several
TEXT_EXT = "txt"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_SHARD_ID_BITS = 32  # sample id = shard number << 32 | position of the sample in its shard


def is_brace_pattern(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``{a..b}`` range or ``{x,y}`` list to expand."""
    return any(".." in m or "," in m for m in _BRACE.findall(str(path)))


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero-padded to the start's width when it has a leading zero) and ``{a,b}``
    lists, left to right and nested in order: ``s-{0..1}-{a,b}`` → ``s-0-a, s-0-b, s-1-a, s-1-b``."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numbers = _RANGE.match(body)
    if numbers:
        start_text, end_text = numbers.groups()
        start, end = int(start_text), int(end_text)
        width = len(start_text) if start_text.startswith("0") and len(start_text) > 1 else 0
        step = 1 if end >= start else -1
        options = [str(n).zfill(width) for n in range(start, end + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = ["{" + body + "}"]  # not a pattern: keep the braces literally
    return [head + option + rest for option in options for rest in expand_braces(tail)]


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def list_shards(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shard files named by ``path``: a shard, a folder (its shards, sorted by name), a brace pattern or a
    glob (expanded; missing shards of a brace pattern are kept and counted when read), or a list of those.
    Raises :class:`ClipcraftError` when nothing matches."""
    if isinstance(path, (list, tuple)):
        return [shard for item in path for shard in list_shards(item)]
    text = os.fspath(path)  # type: ignore[arg-type]
    if is_brace_pattern(text):
        shards = [Path(p) for p in expand_braces(text)]
    elif any(c in text for c in "*?["):
        shards = [Path(p) for p in sorted(glob.glob(text))]
    elif Path(text).is_dir():
        shards = sorted(p for p in Path(text).iterdir() if p.is_file() and _is_shard_name(p.name))
    elif Path(text).is_file():
        shards = [Path(text)]
    else:
        raise ClipcraftError(f"WebDataset shards not found: {text}")
    if not shards:
        raise ClipcraftError(f"No .tar shards in {text}.")
    return shards


@dataclass
class RawSample:
    """A complete sample as stored: its id, where it came from (``shard:key``), image bytes and caption."""

    sample_id: int
    where: str
    image: bytes
    caption: str


def _sample_from_members(sample_id: int, where: str, members: dict[str, bytes]) -> RawSample | BadItem:
    image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
    if image_ext is None or TEXT_EXT not in members:
        missing = " and ".join(
            what
            for what, absent in (
                ("an image member", image_ext is None),
                ("a txt member", TEXT_EXT not in members),
            )
            if absent
        )
        return BadItem(sample_id, INCOMPLETE_SAMPLE, where, f"sample has no {missing}")
    try:
        caption = members[TEXT_EXT].decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError as exc:
        return BadItem(sample_id, BAD_ENCODING, where, f"caption is not valid UTF-8 ({exc.reason})")
    if not caption:
        return BadItem(sample_id, EMPTY_CAPTION, where, "caption is empty")
    return RawSample(sample_id, where, members[image_ext], caption)


def iter_shard(path: Path, shard_number: int = 0) -> Iterator[RawSample | BadItem]:
    """Stream the samples of one shard in stored order; problems come out as :class:`BadItem` (never raised).

    ``sample_id`` is ``shard_number << 32 | position``, stable across runs for a fixed shard list.
    """
    if not path.is_file():
        yield BadItem(-1, MISSING_FILE, str(path), "shard file not found")
        return
    base_id = shard_number << _SHARD_ID_BITS
    position = 0
    key: str | None = None
    members: dict[str, bytes] = {}
    wanted = (*IMAGE_EXTS, TEXT_EXT)
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, filename = posixpath.split(member.name)
                if "." not in filename:
                    continue
                stem, ext = filename.split(".", 1)
                member_key = posixpath.join(dirname, stem)
                if member_key != key:
                    if key is not None:
                        yield _sample_from_members(base_id + position, f"{path}:{key}", members)
                        position += 1
                    key, members = member_key, {}
                ext = ext.lower()
                if ext in wanted:
                    handle = tar.extractfile(member)
                    if handle is not None:
                        members[ext] = handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        # The sample being read is lost with the rest of the shard; the shard counts once.
        yield BadItem(
            -1, BAD_SHARD, str(path), f"not a tar file or truncated after {position} samples: {exc}"
        )
        return
    if key is not None:
        yield _sample_from_members(base_id + position, f"{path}:{key}", members)


class WebDatasetStream(IterableDataset):
    """Streams :class:`CaptionItem` ``(image, caption, sample_id)`` from tar shards; bad samples as
    :class:`BadItem`. See the module docstring for how shards are split across ranks and workers.

    ``rank``/``world_size`` default to torch.distributed's when it is initialized at iteration time, else 0/1.
    ``shuffle_buffer`` > 0 shuffles samples within a buffer of that size, seeded from (seed, epoch, rank, worker).
    Call :meth:`set_epoch` before each epoch (with persistent DataLoader workers the call does not reach the
    workers; re-create the iterator instead).
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
    ) -> None:
        super().__init__()
        self.shards = list_shards(shards)
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
        self.epoch = 0
        self.report = BadDataReport(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order (and buffer shuffle) the next iteration uses."""
        self.epoch = epoch

    def _placement(self) -> tuple[int, int]:
        rank, world_size = rank_and_world_size(self.rank, self.world_size)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + worker, world_size * workers

    def shard_order(self, epoch: int | None = None) -> list[int]:
        """Indices into :attr:`shards` in the order an epoch reads them (before dealing to ranks/workers)."""
        epoch = self.epoch if epoch is None else epoch
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return [int(i) for i in order]

    def my_shards(self) -> list[int]:
        """The shard indices this process (rank and DataLoader worker) reads in the current epoch."""
        consumer, consumers = self._placement()
        if len(self.shards) < consumers and consumer == 0:
            warnings.warn(
                f"{len(self.shards)} shards for {consumers} rank x worker pairs: some workers get no data. "
                "Use more shards or fewer workers.",
                stacklevel=2,
            )
        return self.shard_order()[consumer::consumers]

    def _raw(self) -> Iterator[RawSample | BadItem]:
        for i in self.my_shards():
            yield from iter_shard(self.shards[i], i)

    def _shuffled(self, samples: Iterator[RawSample | BadItem]) -> Iterator[RawSample | BadItem]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        consumer, _ = self._placement()
        rng = np.random.default_rng([self.seed, self.epoch, consumer])
        buffer: list[RawSample | BadItem] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def __iter__(self) -> Iterator[CaptionItem | BadItem]:
        for sample in self._shuffled(self._raw()):
            self.report.seen()
            if isinstance(sample, BadItem):
                self.report.add_item(sample)
                yield sample
                continue
            try:
                image = decode_image(sample.image, sample.where)
            except BadImageError as exc:
                bad = BadItem(sample.sample_id, exc.kind, exc.where, exc.reason)
                self.report.add_item(bad)
                yield bad
                continue
            caption = self.text_transform(sample.caption) if self.text_transform else sample.caption
            yield CaptionItem(self.transform(image) if self.transform else image, caption, sample.sample_id)

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

    def __repr__(self) -> str:
        return f"WebDatasetStream(shards={len(self.shards)}, source={self.source!r}, epoch={self.epoch})"
