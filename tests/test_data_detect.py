"""Format detection and open_dataset()."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipcraft.data import CaptionDataset, WebDatasetStream, detect_format, open_dataset
from clipcraft.errors import ClipcraftError, UnknownNameError


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (50, 50, 50)).save(path)


@pytest.fixture
def layouts(tmp_path: Path) -> dict[str, Path]:
    flickr = tmp_path / "flickr"
    _png(flickr / "images" / "a.jpg")
    (flickr / "captions.txt").write_text('image,caption\na.jpg,"one, two"\n')
    (flickr / "splits").mkdir()
    (flickr / "splits" / "test.txt").write_text("a.jpg\n")

    hf = tmp_path / "hf"
    _png(hf / "train" / "a.png")
    (hf / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "hf"}) + "\n")

    coco = tmp_path / "coco" / "captions.json"
    _png(coco.parent / "a.png")
    coco.write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": "c"}]}
        )
    )
    other_json = tmp_path / "coco" / "other.json"
    other_json.write_text(json.dumps({"rows": []}))

    table = tmp_path / "table" / "pairs.tsv"
    _png(table.parent / "a.png")
    table.write_text("path\ttext\na.png\ttab caption\n")

    shards = tmp_path / "wds"
    shards.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    for s in range(2):
        with tarfile.open(shards / f"part-{s:02d}.tar", "w") as tar:
            for name, data in ((f"k{s}.png", buf.getvalue()), (f"k{s}.txt", b"wds caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {"flickr": flickr, "hf": hf, "coco": coco, "other_json": other_json, "table": table, "wds": shards}


def test_detect_format_for_each_layout(layouts):
    assert detect_format(layouts["flickr"]) == "flickr"
    assert detect_format(layouts["flickr"] / "captions.txt") == "flickr"
    assert detect_format(layouts["hf"]) == "imagefolder"
    assert detect_format(layouts["coco"]) == "coco"
    assert detect_format(layouts["table"]) == "table"
    assert detect_format(layouts["wds"]) == "webdataset"
    assert detect_format(layouts["wds"] / "part-00.tar") == "webdataset"
    assert detect_format(str(layouts["wds"] / "part-{00..01}.tar")) == "webdataset"
    with pytest.raises(ClipcraftError, match="not a COCO"):
        detect_format(layouts["other_json"])
    with pytest.raises(ClipcraftError, match="Cannot tell"):
        detect_format(layouts["flickr"] / "splits")
    with pytest.raises(ClipcraftError, match="not found"):
        detect_format(layouts["flickr"] / "nothing.csv")


def test_open_dataset_reads_every_format_with_transforms(layouts):
    expected = {"flickr": "one, two", "hf": "hf", "coco": "c", "table": "tab caption"}
    for key, caption in expected.items():
        ds = open_dataset(layouts[key], transform=lambda im: torch.ones(3, 2, 2), text_transform=str.upper)
        assert isinstance(ds, CaptionDataset)
        item = ds[0]
        assert item.caption == caption.upper() and item.image.shape == (3, 2, 2)
    stream = open_dataset(str(layouts["wds"] / "part-{00..01}.tar"), shuffle=False, text_transform=str.title)
    assert isinstance(stream, WebDatasetStream)
    assert [it.caption for it in stream] == ["Wds Caption", "Wds Caption"]


def test_format_override_split_and_option_errors(layouts):
    assert len(open_dataset(layouts["flickr"] / "captions.txt", format="csv", check_files=False)) == 1
    assert open_dataset(layouts["flickr"], split="test").split == "test"
    with pytest.raises(UnknownNameError) as info:
        open_dataset(layouts["flickr"], format="parquet")
    message = str(info.value)
    assert all(name in message for name in ("flickr", "table", "coco", "imagefolder", "webdataset"))
    with pytest.raises(ClipcraftError, match="no splits"):
        open_dataset(layouts["table"], split="train")
    with pytest.raises(ClipcraftError, match="not accepted"):
        open_dataset(layouts["table"], shuffle_buffer=3)
