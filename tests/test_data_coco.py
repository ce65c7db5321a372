"""The COCO captions JSON reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipcraft.data import read_coco
from clipcraft.data.report import EMPTY_CAPTION, INCOMPLETE_SAMPLE, MALFORMED_ROW, MISSING_FILE
from clipcraft.errors import ClipcraftError


def _coco(path: Path, images: list[dict], annotations: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (5, 5), (0, 90, 0)).save(path)


def test_reads_and_groups_annotations_with_bad_ones_counted(tmp_path):
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        _image(tmp_path / "imgs" / name)
    images = [
        {"id": 10, "file_name": "1.jpg"},
        {"id": 20, "file_name": "2.jpg"},
        {"id": 30, "file_name": "3.jpg"},  # no annotation
        {"id": 40, "file_name": "gone.jpg"},
        {"file_name": "no-id.jpg"},
    ]
    annotations = [
        {"id": 1, "image_id": 20, "caption": "Two, green."},
        {"id": 2, "image_id": 10, "caption": " One green square. "},
        {"id": 3, "image_id": 20, "caption": "Another for two."},
        {"id": 4, "image_id": 10, "caption": ""},
        {"id": 5, "image_id": 99, "caption": "unknown image"},
        {"id": 6, "caption": "no image id"},
        {"id": 7, "image_id": 40, "caption": "file is missing"},
    ]
    path = _coco(tmp_path / "captions.json", images, annotations)
    ds = read_coco(path, image_root=tmp_path / "imgs")
    assert [(Path(r.image).name, r.captions) for r in ds.records] == [
        ("1.jpg", ("One green square.",)),
        ("2.jpg", ("Two, green.", "Another for two.")),
    ]
    assert ds.report.counts == {MALFORMED_ROW: 3, EMPTY_CAPTION: 1, INCOMPLETE_SAMPLE: 1, MISSING_FILE: 1}
    assert ds.report.total == 7 + 1 + 1  # annotations + uncaptioned image + malformed image entry


def test_image_root_is_found_beside_the_annotations_folder(tmp_path):
    _image(tmp_path / "train2017" / "000001.jpg")
    path = _coco(
        tmp_path / "annotations" / "captions_train2017.json",
        [{"id": 1, "file_name": "000001.jpg"}],
        [{"image_id": 1, "caption": "a caption"}],
    )
    ds = read_coco(path)
    assert ds.records[0].image == str(tmp_path / "train2017" / "000001.jpg")
    assert not ds.report


def test_not_coco_json_is_a_clear_error(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ClipcraftError, match="not a COCO captions file"):
        read_coco(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{broken")
    with pytest.raises(ClipcraftError, match="not valid JSON"):
        read_coco(tmp_path / "y.json")
