"""The Flickr8k/30k folder reader, on a small fixture and on the real Flickr8k copy when present."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from clipcraft.data import read_flickr
from clipcraft.data.report import INCOMPLETE_SAMPLE, MISSING_FILE
from clipcraft.errors import ClipcraftError, UnknownNameError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _flickr(root: Path, names: list[str], splits: dict[str, list[str]]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    with (root / "captions.txt").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i, name in enumerate(names):
            Image.new("RGB", (6, 6), (i * 20 % 255, 0, 0)).save(root / "images" / name)
            writer.writerow([name, f"Image {i}, first caption ."])
            writer.writerow([name, f"Image {i} second caption ."])
    for split, members in splits.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(members) + "\n")
    return root


def test_splits_select_their_images_and_val_is_dev(tmp_path):
    names = [f"{i}.jpg" for i in range(6)]
    root = _flickr(tmp_path / "f", names, {"train": names[:3], "dev": names[3:5], "test": names[5:]})
    train = read_flickr(root, "train")
    assert [Path(r.image).name for r in train.records] == names[:3]
    assert train.records[0].captions == ("Image 0, first caption .", "Image 0 second caption .")
    assert train.split == "train" and train.report.total == 6 and not train.report
    assert [r.image for r in read_flickr(root, "val").records] == [
        r.image for r in read_flickr(root, "dev").records
    ]
    assert len(read_flickr(root, "test")) == 1
    assert len(read_flickr(root / "captions.txt", "all")) == 6


def test_split_entries_without_captions_or_files_are_counted(tmp_path):
    names = ["a.jpg", "b.jpg", "c.jpg"]
    root = _flickr(tmp_path / "f", names, {"train": ["a.jpg", "b.jpg", "not-captioned.jpg"]})
    (root / "images" / "b.jpg").unlink()
    ds = read_flickr(root, "train")
    assert [Path(r.image).name for r in ds.records] == ["a.jpg"]
    assert ds.report.counts == {MISSING_FILE: 2, INCOMPLETE_SAMPLE: 1}
    assert ds.report.total == 4 + 1


def test_missing_split_file_and_unknown_split_are_errors(tmp_path):
    root = _flickr(tmp_path / "f", ["a.jpg"], {"train": ["a.jpg"]})
    with pytest.raises(ClipcraftError, match="split file"):
        read_flickr(root, "test")
    with pytest.raises(UnknownNameError, match="Known"):
        read_flickr(root, "training")
    with pytest.raises(ClipcraftError, match="captions.txt"):
        read_flickr(tmp_path)


@pytest.mark.data
def test_real_flickr8k_captions_and_splits():
    root = SHARED_DATA / "flickr8k"
    if not (root / "captions.txt").is_file():
        pytest.skip(f"real Flickr8k data not found at {root}")
    everything = read_flickr(root, "all")
    assert len(everything) == 8091
    assert everything.num_captions == 40455
    assert not everything.report, everything.report.render()
    quoted = [c for r in everything.records for c in r.captions if "," in c]
    assert len(quoted) == 2447  # the captions that had to be CSV-quoted kept their commas
    sizes = {split: len(read_flickr(root, split, check_files=False)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 6000, "dev": 1000, "test": 1000}
    assert all(len(r.captions) == 5 for r in read_flickr(root, "test", check_files=False).records)
