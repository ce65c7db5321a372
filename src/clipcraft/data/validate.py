"""Scanning a dataset before a run: count what is bad, and stop early when too much of it is."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from clipcraft.data.dataset import CaptionDataset, CaptionRecord
from clipcraft.data.decode import CHECK_MODES, BadImageError, CheckMode, check_image
from clipcraft.data.report import BadDataError, BadDataReport
from clipcraft.data.webdataset import WebDatasetStream


def _check(record: CaptionRecord, mode: CheckMode) -> BadImageError | None:
    try:
        check_image(record.image, mode)
    except BadImageError as exc:
        return exc
    return None


def validate(
    dataset: CaptionDataset | WebDatasetStream,
    max_bad_fraction: float = 0.05,
    check_images: CheckMode = "header",
    num_threads: int | None = None,
) -> BadDataReport:
    """Scan ``dataset`` and return a report of its bad rows (index-time problems plus image checks).

    ``check_images``: ``"none"`` only checks that image files exist, ``"header"`` also opens each image's header
    (format, pixel limit, ``Image.verify()``; fast, but a truncated JPEG passes), ``"decode"`` decodes every
    image. A bad image counts once per caption it has, so ``bad_fraction`` is the share of image–caption pairs
    lost. Map-style datasets are checked with ``num_threads`` threads (default: up to 8); a
    :class:`WebDatasetStream` is read in full, all shards.

    Raises :class:`~clipcraft.data.report.BadDataError` (a ClipcraftError carrying the report) when the bad
    fraction exceeds ``max_bad_fraction`` or no row was examined.
    """
    if check_images not in CHECK_MODES:
        raise ValueError(f"check_images must be one of {CHECK_MODES}, got {check_images!r}")
    if isinstance(dataset, WebDatasetStream):
        report = dataset.scan(check_images)
    else:
        report = dataset.report.copy()
        threads = num_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = pool.map(lambda r: _check(r, check_images), dataset.records, chunksize=64)
            for record, problem in zip(dataset.records, results, strict=True):
                if problem is not None:
                    report.add(problem.kind, problem.where, problem.reason, rows=len(record.captions))
    if report.total == 0:
        raise BadDataError(f"No rows to validate in {report.source or 'the dataset'}.", report)
    if report.bad_fraction > max_bad_fraction:
        raise BadDataError(
            f"{100 * report.bad_fraction:.2f}% of the data is bad, over the {100 * max_bad_fraction:.2f}% limit.\n"
            f"{report.render()}\n"
            "Fix or remove the files listed, or raise max_bad_fraction to train on what is usable.",
            report,
        )
    return report
