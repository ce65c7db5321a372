"""Bad-data accounting: problems are counted by kind with a few examples, never fatal one by one.

Every count in a :class:`BadDataReport` is in one unit, image–caption pairs ("rows"): a missing image with five
captions loses five rows, an empty caption loses one. ``total`` is the number of rows examined, so
``bad_fraction`` is the share of the data that a run loses. The readers fill one report while they build their
index; the datasets fill another while they load items; :func:`clipcraft.data.validate` combines the index report
with an image scan and raises :class:`BadDataError` when too much is bad.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from clipcraft.errors import ClipcraftError
from clipcraft.images import MISSING_FILE, TOO_LARGE, UNREADABLE_IMAGE

# The kinds of bad data the readers and datasets count. Other strings are accepted too. The three image kinds
# are those of clipcraft.images.BadImageError: missing_file (the image, or here also a shard, does not exist),
# unreadable_image (not an image, truncated, fails to decode), too_large (over the pixel limit).
EMPTY_CAPTION = "empty_caption"  # caption is empty after stripping whitespace
BAD_ENCODING = "bad_encoding"  # caption or row bytes are not valid UTF-8
MALFORMED_ROW = "malformed_row"  # wrong number of fields, invalid JSON, missing keys, unbalanced quotes
INCOMPLETE_SAMPLE = "incomplete_sample"  # an image without any caption, or a caption without an image
BAD_SHARD = "bad_shard"  # a tar shard that is not a tar file or ends early

KINDS = (
    MISSING_FILE,
    UNREADABLE_IMAGE,
    TOO_LARGE,
    EMPTY_CAPTION,
    BAD_ENCODING,
    MALFORMED_ROW,
    INCOMPLETE_SAMPLE,
    BAD_SHARD,
)


class BadDataError(ClipcraftError):
    """Too large a share of a dataset is bad; the message carries the rendered report."""

    def __init__(self, message: str, report: BadDataReport) -> None:
        super().__init__(message)
        self.report = report


class BadItem(NamedTuple):
    """What a dataset returns in place of an item it could not load.

    ``index`` is the image index in the dataset (a sample id for streams, -1 when unknown), ``kind`` one of
    :data:`KINDS`, ``where`` the file (and row) at fault and ``reason`` a sentence for the user. ``rows`` is the
    number of rows it stands for (1 for a loaded item). Collate functions drop these and keep them in the batch
    so that the counts survive DataLoader worker processes.
    """

    index: int
    kind: str
    where: str
    reason: str
    rows: int = 1


@dataclass(frozen=True)
class BadExample:
    """One example of a problem, kept for the report: the kind, the file (and row) at fault, and why."""

    kind: str
    where: str
    reason: str


class BadDataReport:
    """Counts of bad rows by kind, the number of rows examined, and up to ``max_examples`` examples per kind.

    ``source`` names what was read (a file or folder) in the rendered text. Reports from several readers,
    workers or ranks combine with :meth:`merge`; :meth:`to_dict` / :meth:`from_dict` round-trip through JSON.
    """

    def __init__(self, source: str = "", max_examples: int = 3) -> None:
        self.source = source
        self.max_examples = max_examples
        self.total = 0
        self.counts: Counter[str] = Counter()
        self.examples: list[BadExample] = []

    # -- filling ------------------------------------------------------------------------------------------
    def seen(self, rows: int = 1) -> None:
        """Record that ``rows`` rows were examined (good or bad)."""
        self.total += rows

    def add(self, kind: str, where: str, reason: str, rows: int = 1) -> None:
        """Count ``rows`` bad rows of ``kind`` (they must also have been :meth:`seen`), keeping an example."""
        self.counts[kind] += rows
        if sum(1 for e in self.examples if e.kind == kind) < self.max_examples:
            self.examples.append(BadExample(kind, where, reason))

    def add_item(self, item: BadItem) -> None:
        """Count a :class:`BadItem` returned by a dataset (not marking it seen)."""
        self.add(item.kind, item.where, item.reason, rows=item.rows)

    def record_batch(self, num_good: int, bad_items: Iterable[BadItem]) -> None:
        """Account for one collated batch: ``num_good`` loaded items plus the dropped ``bad_items``."""
        bad_items = list(bad_items)
        self.seen(num_good + sum(b.rows for b in bad_items))
        for item in bad_items:
            self.add_item(item)

    def merge(self, other: BadDataReport) -> BadDataReport:
        """Add ``other``'s counts, total and examples into this report; returns ``self``."""
        self.total += other.total
        for example in other.examples:
            if sum(1 for e in self.examples if e.kind == example.kind) < self.max_examples:
                self.examples.append(example)
        self.counts.update(other.counts)
        return self

    def copy(self) -> BadDataReport:
        """An independent copy."""
        return BadDataReport(self.source, self.max_examples).merge(self)

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def num_bad(self) -> int:
        """Bad rows of every kind."""
        return sum(self.counts.values())

    @property
    def bad_fraction(self) -> float:
        """Bad rows over rows examined; 0.0 when nothing was examined."""
        return self.num_bad / self.total if self.total else 0.0

    def __bool__(self) -> bool:  # a report is "truthy" when it has something to report
        return self.num_bad > 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: source, total, bad, bad_fraction, counts by kind and examples."""
        return {
            "source": self.source,
            "total": self.total,
            "bad": self.num_bad,
            "bad_fraction": self.bad_fraction,
            "counts": dict(sorted(self.counts.items())),
            "examples": [{"kind": e.kind, "where": e.where, "reason": e.reason} for e in self.examples],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], max_examples: int = 3) -> BadDataReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. gathered from other ranks)."""
        report = cls(str(data.get("source", "")), max_examples)
        report.total = int(data.get("total", 0))
        report.counts.update({str(k): int(v) for k, v in dict(data.get("counts", {})).items()})
        report.examples = [BadExample(e["kind"], e["where"], e["reason"]) for e in data.get("examples", [])]
        return report

    def render(self) -> str:
        """A few lines for people: the totals, one line per kind, then the examples."""
        name = f" in {self.source}" if self.source else ""
        if not self.num_bad:
            return f"No bad data{name}: {self.total:,} rows examined."
        lines = [
            f"{self.num_bad:,} of {self.total:,} rows skipped{name} ({100 * self.bad_fraction:.2f}%):",
        ]
        for kind, count in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {kind}: {count:,}")
        if self.examples:
            lines.append("Examples:")
            lines.extend(f"  [{e.kind}] {e.where}: {e.reason}" for e in self.examples)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"BadDataReport(source={self.source!r}, total={self.total}, counts={dict(self.counts)})"
