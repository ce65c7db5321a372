"""BadDataReport: counting by kind, examples, merging, and the dict/text forms."""

from __future__ import annotations

import json

from clipcraft.data import BadDataReport, BadItem
from clipcraft.data.report import EMPTY_CAPTION, MISSING_FILE


def test_counts_by_kind_and_fraction():
    report = BadDataReport("captions.csv")
    report.seen(10)
    report.add(MISSING_FILE, "a.jpg", "image file not found", rows=3)
    report.add(EMPTY_CAPTION, "captions.csv:4", "caption is empty")
    assert report.counts == {MISSING_FILE: 3, EMPTY_CAPTION: 1}
    assert report.num_bad == 4
    assert report.bad_fraction == 0.4
    assert report  # truthy when something is bad


def test_examples_are_capped_per_kind():
    report = BadDataReport(max_examples=2)
    for i in range(5):
        report.seen()
        report.add(EMPTY_CAPTION, f"f:{i}", "caption is empty")
    report.add(MISSING_FILE, "x.jpg", "image file not found")
    kinds = [e.kind for e in report.examples]
    assert kinds.count(EMPTY_CAPTION) == 2 and kinds.count(MISSING_FILE) == 1
    assert report.counts[EMPTY_CAPTION] == 5


def test_merge_and_dict_round_trip_through_json():
    a, b = BadDataReport("src"), BadDataReport("src")
    a.seen(5)
    a.add(MISSING_FILE, "a.jpg", "gone")
    b.record_batch(3, [BadItem(7, EMPTY_CAPTION, "b:1", "caption is empty")])
    a.merge(b)
    assert a.total == 9 and a.counts == {MISSING_FILE: 1, EMPTY_CAPTION: 1}
    back = BadDataReport.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.to_dict() == a.to_dict()


def test_render_names_kinds_and_examples():
    report = BadDataReport("data.csv")
    report.seen(4)
    assert "No bad data" in report.render()
    report.add(MISSING_FILE, "/data/a.jpg", "image file not found", rows=2)
    text = report.render()
    assert "2 of 4 rows skipped in data.csv (50.00%)" in text
    assert "missing_file: 2" in text and "/data/a.jpg" in text
    assert report.copy().counts == report.counts and report.copy() is not report
