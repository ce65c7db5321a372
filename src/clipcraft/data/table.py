"""Reader for caption tables: CSV, TSV or JSON Lines files with an image column and a caption column.

Rows for the same image are grouped into one record. Column names are found automatically among the common ones
(:data:`IMAGE_COLUMNS`, :data:`CAPTION_COLUMNS`, case-insensitive) unless given. Image paths are relative to
``image_root``, by default the table file's folder; absolute paths are kept. CSV/TSV files need a header row and
are parsed with the :mod:`csv` module, so quoted captions may contain the delimiter. In JSON Lines the caption
value may also be a list of captions.

Bad rows are counted in the dataset's report, never raised: a row with the wrong number of fields, invalid JSON
or a missing key (``malformed_row``), bytes that are not UTF-8 (``bad_encoding``), an empty caption
(``empty_caption``), and, with ``check_files``, an image file that does not exist (``missing_file``, counted once
per caption of that image).

The building blocks (:func:`iter_table_rows`, :func:`build_records`) are shared with the Flickr and image-folder
readers.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipcraft.data.dataset import CaptionDataset, CaptionRecord
from clipcraft.data.report import (
    BAD_ENCODING,
    EMPTY_CAPTION,
    MALFORMED_ROW,
    MISSING_FILE,
    BadDataReport,
)
from clipcraft.errors import ClipcraftError

# Column names tried, in order, when none is given (compared case-insensitively).
IMAGE_COLUMNS = (
    "image",
    "filepath",
    "file_path",
    "file_name",
    "filename",
    "image_path",
    "img",
    "path",
    "file",
)
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "sentence", "description", "alt_text")

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


@dataclass
class TableRow:
    """One data row of a table file: ``where`` is ``file:line``; ``values`` is the row as a mapping, or None
    with ``kind``/``reason`` saying why the row is unusable."""

    where: str
    values: Mapping[str, Any] | None
    kind: str = ""
    reason: str = ""


def _is_utf8_clean(text: str) -> bool:
    # Files are read with errors="surrogateescape": undecodable bytes become lone surrogates, caught here.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_table_rows(path: Path, delimiter: str | None = None) -> Iterator[TableRow]:
    """Yield the data rows of a CSV/TSV (header row required) or JSON Lines file, bad rows included.

    The format follows the suffix (``.jsonl``/``.ndjson`` are JSON Lines, ``.tsv`` tab-separated, anything else
    comma-separated) unless ``delimiter`` is given. Blank lines are skipped. Raises :class:`ClipcraftError`
    only when the file cannot be opened or a CSV has no header.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipcraftError(f"Caption table not found: {path}")
    if delimiter is None and path.suffix.lower() in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path)
    else:
        if delimiter is None:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        yield from _iter_csv(path, delimiter)


def _iter_jsonl(path: Path) -> Iterator[TableRow]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield TableRow(
                    where, None, BAD_ENCODING, f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                )
                continue
            line = line.lstrip("\ufeff").strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield TableRow(where, None, MALFORMED_ROW, f"invalid JSON: {exc.msg}")
                continue
            if not isinstance(obj, dict):
                yield TableRow(
                    where, None, MALFORMED_ROW, f"expected a JSON object, got {type(obj).__name__}"
                )
                continue
            yield TableRow(where, obj)


def _iter_csv(path: Path, delimiter: str) -> Iterator[TableRow]:
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header: list[str] | None = None
        last_line = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                last_line = reader.line_num
                yield TableRow(f"{path}:{reader.line_num}", None, MALFORMED_ROW, f"CSV error: {exc}")
                continue
            first_line, last_line = last_line + 1, reader.line_num
            where = f"{path}:{first_line}"
            if not fields or all(not x.strip() for x in fields):
                continue
            if header is None:
                header = [h.strip() for h in fields]
                continue
            if len(fields) != len(header):
                extra = fields[len(header) :]
                if len(fields) > len(header) and all(not x.strip() for x in extra):
                    fields = fields[: len(header)]  # trailing delimiters
                else:
                    yield TableRow(
                        where,
                        None,
                        MALFORMED_ROW,
                        f"expected {len(header)} fields, found {len(fields)} "
                        "(a caption with an unquoted delimiter?)",
                    )
                    continue
            values = dict(zip(header, fields, strict=True))
            if last_line > first_line:
                # A quoted field ran over several lines: almost always an unbalanced quote that swallowed rows.
                values["__spans_lines__"] = f"{first_line}-{last_line}"
            yield TableRow(where, values)
        if header is None:
            raise ClipcraftError(f"{path} is empty; expected a header row such as 'image,caption'.")


def resolve_column(
    available: Iterable[str], wanted: str | None, candidates: tuple[str, ...], role: str, path: Path
) -> str:
    """The column to use for ``role`` ("image" or "caption"): ``wanted`` if given (it must exist), else the
    first of ``candidates`` present (case-insensitive). Raises :class:`ClipcraftError` listing the columns."""
    columns = [c for c in available if not c.startswith("__")]
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise ClipcraftError(
            f"{path} has no {role} column {wanted!r}; its columns are {columns}. Pass {role}_column=<name>."
        )
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise ClipcraftError(
        f"Could not find the {role} column in {path}: its columns are {columns}, none of {list(candidates)}. "
        f"Pass {role}_column=<name>."
    )


def build_records(
    rows: Iterable[TableRow],
    *,
    path: Path,
    image_root: Path,
    report: BadDataReport,
    image_column: str | None = None,
    caption_column: str | None = None,
    check_files: bool = True,
    keep: Callable[[str], bool] | None = None,
    names_seen: set[str] | None = None,
) -> list[CaptionRecord]:
    """Group table rows by image into records, counting every bad row in ``report``.

    ``keep``, if given, is called with the raw image value of each well-formed row; rows it rejects are skipped
    without being counted (used for split filtering). ``names_seen``, if given, receives the raw image value of
    every kept row, good or bad. Columns are resolved on the first well-formed row.
    """
    groups: dict[str, list[str]] = {}
    root = os.fspath(image_root)
    columns: tuple[str, str] | None = None
    for row in rows:
        if row.values is None:
            report.seen()
            report.add(row.kind, row.where, row.reason)
            continue
        if columns is None:
            columns = (
                resolve_column(row.values, image_column, IMAGE_COLUMNS, "image", path),
                resolve_column(row.values, caption_column, CAPTION_COLUMNS, "caption", path),
            )
        image_key, caption_key = columns
        image_value = row.values.get(image_key)
        caption_value = row.values.get(caption_key)
        image_name = image_value.strip() if isinstance(image_value, str) else ""
        if keep is not None and image_name and not keep(image_name):
            continue
        if names_seen is not None and image_name:
            names_seen.add(image_name)
        captions = caption_value if isinstance(caption_value, list) else [caption_value]
        report.seen(max(len(captions), 1))
        if not image_name:
            report.add(
                MALFORMED_ROW, row.where, f"no image in column {image_key!r}", rows=max(len(captions), 1)
            )
            continue
        if not _is_utf8_clean(image_name):
            report.add(BAD_ENCODING, row.where, "image name is not valid UTF-8", rows=max(len(captions), 1))
            continue
        if not captions:
            report.add(EMPTY_CAPTION, row.where, f"empty caption list in column {caption_key!r}")
            continue
        spans = row.values.get("__spans_lines__")
        image = os.path.join(root, image_name)  # an absolute image_name replaces root
        for caption in captions:
            if not isinstance(caption, str):
                what = "missing" if caption is None else f"a {type(caption).__name__}, not text"
                report.add(MALFORMED_ROW, row.where, f"caption in column {caption_key!r} is {what}")
            elif not _is_utf8_clean(caption):
                report.add(BAD_ENCODING, row.where, "caption is not valid UTF-8")
            elif spans is not None and ("\n" in caption or "\r" in caption):
                report.add(
                    MALFORMED_ROW, row.where, f"quoted caption runs over lines {spans} (unbalanced quote?)"
                )
            elif not caption.strip():
                report.add(EMPTY_CAPTION, row.where, "caption is empty")
            else:
                groups.setdefault(image, []).append(caption.strip())
    return _finish(groups, report, check_files)


def _finish(groups: Mapping[str, list[str]], report: BadDataReport, check_files: bool) -> list[CaptionRecord]:
    records = []
    for image, captions in groups.items():
        if check_files and not os.path.isfile(image):
            report.add(MISSING_FILE, image, "image file not found", rows=len(captions))
            continue
        records.append(CaptionRecord(image, tuple(captions)))
    return records


def read_table(
    path: str | os.PathLike,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    image_root: str | os.PathLike | None = None,
    delimiter: str | None = None,
    check_files: bool = True,
) -> CaptionDataset:
    """Read a CSV, TSV or JSON Lines caption table into a :class:`CaptionDataset` (one record per image).

    ``image_root`` defaults to the table's folder. Raises :class:`ClipcraftError` when the file is missing, has
    no header, its columns cannot be found, or not one usable row remains; bad rows are counted, not raised.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    report = BadDataReport(str(path))
    records = build_records(
        iter_table_rows(path, delimiter),
        path=path,
        image_root=root,
        report=report,
        image_column=image_column,
        caption_column=caption_column,
        check_files=check_files,
    )
    require_records(records, report, path)
    return CaptionDataset(records, report=report, source=str(path), format="table")


def require_records(records: list[CaptionRecord], report: BadDataReport, path: Path) -> None:
    """Raise :class:`ClipcraftError` with the report when a reader found no usable rows at all."""
    if not records:
        raise ClipcraftError(f"No usable image–caption rows in {path}.\n{report.render()}")
