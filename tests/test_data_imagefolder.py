"""The Hugging Face style image folder reader (metadata.jsonl / metadata.csv, optional split folders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipcraft.data import read_imagefolder
from clipcraft.data.report import EMPTY_CAPTION
from clipcraft.errors import ClipcraftError, UnknownNameError


def _folder(folder: Path, rows: list[tuple[str, str]], fmt: str = "jsonl") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, _ in rows:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (10, 20, 200)).save(folder / name)
    if fmt == "jsonl":
        text = "".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in rows)
        (folder / "metadata.jsonl").write_text(text)
    else:
        (folder / "metadata.csv").write_text("file_name,text\n" + "".join(f'{n},"{t}"\n' for n, t in rows))


def test_root_metadata_is_the_train_split(tmp_path):
    _folder(tmp_path, [("a.png", "blue, small"), ("sub/b.png", "also blue"), ("a.png", "")])
    ds = read_imagefolder(tmp_path)
    assert [(Path(r.image).relative_to(tmp_path).as_posix(), r.captions) for r in ds.records] == [
        ("a.png", ("blue, small",)),
        ("sub/b.png", ("also blue",)),
    ]
    assert ds.report.counts == {EMPTY_CAPTION: 1}
    assert len(read_imagefolder(tmp_path, "train")) == 2
    with pytest.raises(ClipcraftError, match="no 'test' split"):
        read_imagefolder(tmp_path, "test")


def test_split_subfolders_with_jsonl_and_csv(tmp_path):
    _folder(tmp_path / "train", [("t1.png", "train one"), ("t2.png", "train two")])
    _folder(tmp_path / "val", [("v1.png", "val, one")], fmt="csv")
    _folder(tmp_path / "test", [("x1.png", "test one")])
    assert len(read_imagefolder(tmp_path, "train")) == 2
    validation = read_imagefolder(tmp_path, "validation")
    assert validation.records[0].captions == ("val, one",)
    assert validation.records[0].image == str(tmp_path / "val" / "v1.png")
    assert [r.image for r in read_imagefolder(tmp_path, "dev").records] == [
        r.image for r in validation.records
    ]
    assert len(read_imagefolder(tmp_path, "all")) == 4
    with pytest.raises(UnknownNameError):
        read_imagefolder(tmp_path, "holdout")


def test_no_metadata_is_an_error(tmp_path):
    with pytest.raises(ClipcraftError, match="metadata"):
        read_imagefolder(tmp_path)
