"""The CSV / TSV / JSON Lines caption table reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipcraft.data import read_table
from clipcraft.data.report import BAD_ENCODING, EMPTY_CAPTION, MALFORMED_ROW, MISSING_FILE
from clipcraft.errors import ClipcraftError


def _image(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)
    return path


def test_csv_with_quoted_commas_groups_rows_by_image(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png")
    (tmp_path / "data.csv").write_text(
        "filepath,title\n"
        'imgs/a.png,"A dog, a ball, and a park."\n'
        "imgs/b.png,A cat on a mat.\n"
        'imgs/a.png,"The dog runs, happily."\n',
        encoding="utf-8",
    )
    ds = read_table(tmp_path / "data.csv")
    assert len(ds) == 2 and ds.num_captions == 3
    first = ds.records[0]
    assert first.image == str(tmp_path / "imgs" / "a.png")
    assert first.captions == ("A dog, a ball, and a park.", "The dog runs, happily.")
    assert ds.report.total == 3 and not ds.report


def test_bad_rows_are_counted_by_kind_not_raised(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    raw = (
        b"image,caption\n"
        b"a.png,fine caption\n"
        b"a.png,   \n"  # empty after strip
        b"b.png,caf\xe9 in latin-1\n"  # not UTF-8
        b"b.png,too,many,fields\n"  # unquoted commas
        b"missing.png,nobody home\n"
        b"missing.png,still nobody\n"
        b",no image\n"
        b"b.png,a good one\n"
    )
    (tmp_path / "t.csv").write_bytes(raw)
    ds = read_table(tmp_path / "t.csv")
    assert [r.captions for r in ds.records] == [("fine caption",), ("a good one",)]
    assert ds.report.counts == {
        EMPTY_CAPTION: 1,
        BAD_ENCODING: 1,
        MALFORMED_ROW: 2,
        MISSING_FILE: 2,  # one missing image with two captions
    }
    assert ds.report.total == 8
    where = {e.kind: e.where for e in ds.report.examples}
    assert where[BAD_ENCODING].endswith("t.csv:4")
    assert where[MISSING_FILE].endswith("missing.png")


def test_unbalanced_quote_is_reported_as_malformed(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text('image,caption\na.png,ok\na.png,"opens a quote\na.png,swallowed\n')
    ds = read_table(tmp_path / "t.csv")
    assert ds.records[0].captions == ("ok",)
    assert ds.report.counts == {MALFORMED_ROW: 1}
    assert "unbalanced quote" in ds.report.examples[0].reason


def test_tsv_and_custom_columns_and_image_root(tmp_path):
    _image(tmp_path / "pics" / "x.jpg")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "t.tsv").write_text("id\tpic\tsentence\n1\tx.jpg\tRed, square\n2\tx.jpg\tSmall\n")
    with pytest.raises(ClipcraftError, match="columns are"):
        read_table(tmp_path / "meta" / "t.tsv", image_root=tmp_path / "pics")  # 'pic' is not a known name
    ds = read_table(tmp_path / "meta" / "t.tsv", image_column="pic", image_root=tmp_path / "pics")
    assert ds.records[0].captions == ("Red, square", "Small")
    assert ds.records[0].image == str(tmp_path / "pics" / "x.jpg")


def test_jsonl_with_caption_lists_and_bad_lines(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    lines = [
        json.dumps({"file_name": "a.png", "text": ["one", "two", ""]}).encode(),
        b"{not json",
        json.dumps({"file_name": "b.png", "text": "three"}).encode(),
        b"",
        '{"file_name": "b.png", "text": "caf\u00e9"}'.encode("latin-1"),
        json.dumps({"file_name": "b.png"}).encode(),
        json.dumps(["a.png", "list, not object"]).encode(),
    ]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = read_table(tmp_path / "m.jsonl")
    assert [r.captions for r in ds.records] == [("one", "two"), ("three",)]
    assert ds.report.counts == {EMPTY_CAPTION: 1, MALFORMED_ROW: 3, BAD_ENCODING: 1}
    assert ds.report.total == 3 + 1 + 1 + 1 + 1 + 1


def test_absolute_paths_are_kept_and_check_files_can_be_off(tmp_path):
    img = _image(tmp_path / "elsewhere" / "a.png")
    (tmp_path / "t.csv").write_text(f"image,caption\n{img},abs\nghost.png,no file\n")
    ds = read_table(tmp_path / "t.csv", check_files=False)
    assert [r.image for r in ds.records] == [str(img), str(tmp_path / "ghost.png")]
    assert not ds.report


def test_no_usable_rows_and_missing_file_raise(tmp_path):
    (tmp_path / "t.csv").write_text("image,caption\nghost.png,x\n")
    with pytest.raises(ClipcraftError, match="No usable") as info:
        read_table(tmp_path / "t.csv")
    assert "missing_file" in str(info.value)
    with pytest.raises(ClipcraftError, match="not found"):
        read_table(tmp_path / "nope.csv")
