"""CaptionDataset items, the drop-and-count strategy for bad images, collate, decode checks and validate()."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import clipcraft.images
from clipcraft.data import (
    BadDataError,
    BadDataReport,
    BadImageError,
    BadItem,
    CaptionCollate,
    CaptionDataset,
    CaptionGroupedBatchSampler,
    CaptionItem,
    CaptionRecord,
    check_image,
    collate,
    decode_image,
    read_table,
    validate,
)
from clipcraft.data.report import MISSING_FILE, TOO_LARGE, UNREADABLE_IMAGE


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1)  # (3, 4, 4)


def _noise_jpeg(path: Path, size: int = 96) -> bytes:
    Image.effect_noise((size, size), 60).convert("RGB").save(path, format="JPEG")
    return path.read_bytes()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Ten good images plus one of each kind of broken file, and a CSV naming them all (two captions each)."""
    for i in range(10):
        Image.new("RGB", (10, 7), (i * 25, 100, 50)).save(tmp_path / f"good{i}.png")
    data = _noise_jpeg(tmp_path / "truncated.jpg")
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) * 3 // 4])
    (tmp_path / "text.jpg").write_text("I am not a JPEG")
    Image.new("RGB", (300, 300), (1, 2, 3)).save(tmp_path / "big.png")
    names = [f"good{i}.png" for i in range(10)] + ["truncated.jpg", "text.jpg", "big.png"]
    rows = "".join(f'{n},"{n}, first"\n{n},{n} second\n' for n in names)
    (tmp_path / "data.csv").write_text("image,caption\n" + rows)
    return tmp_path


def test_items_carry_tensor_caption_and_index(folder):
    ds = read_table(folder / "data.csv").with_transforms(to_tensor, str.upper)
    item = ds[3, 1]
    assert isinstance(item, CaptionItem)
    assert item.image.shape == (3, 4, 4) and item.caption == "GOOD3.PNG SECOND" and item.index == 3
    assert ds[0].caption == "GOOD0.PNG, FIRST"
    assert ds[np.int64(2)].index == 2 and ds[np.int64(2), np.int64(1)].caption == "GOOD2.PNG SECOND"
    assert [Path(r.image).name for r in ds.subset([4, 1]).records] == ["good4.png", "good1.png"]
    assert ds.caption_counts() == [2] * 13
    raw = read_table(folder / "data.csv")[0]
    assert isinstance(raw.image, Image.Image) and raw.image.mode == "RGB"


def test_bad_images_come_back_as_bad_items_and_are_counted(folder, monkeypatch):
    monkeypatch.setattr(clipcraft.images, "MAX_IMAGE_PIXELS", 200 * 200)
    ds = read_table(folder / "data.csv").with_transforms(to_tensor)
    kinds = {Path(ds.records[i].image).name: ds[i] for i in range(10, 13)}
    assert all(isinstance(v, BadItem) for v in kinds.values())
    assert {k: v.kind for k, v in kinds.items()} == {
        "truncated.jpg": UNREADABLE_IMAGE,
        "text.jpg": UNREADABLE_IMAGE,
        "big.png": TOO_LARGE,
    }
    assert ds.load_report.total == 3 and ds.load_report.counts == {UNREADABLE_IMAGE: 2, TOO_LARGE: 1}


def test_collate_stacks_good_items_and_keeps_bad_ones_aside():
    good = [CaptionItem(torch.full((3, 2, 2), float(i)), f"c{i}", i) for i in range(3)]
    bad = BadItem(9, UNREADABLE_IMAGE, "x.jpg", "could not decode")
    batch = collate([good[0], bad, good[1], good[2]])
    assert batch.images.shape == (3, 3, 2, 2) and batch.images[2, 0, 0, 0] == 2.0
    assert batch.captions == ["c0", "c1", "c2"] and batch.indices.tolist() == [0, 1, 2]
    assert batch.bad == (bad,) and len(batch) == 3
    empty = CaptionCollate(tokenize=lambda caps: len(caps))([bad])
    assert len(empty) == 0 and empty.tokens == 0 and empty.indices.dtype == torch.int64
    report = BadDataReport()
    report.record_batch(len(batch), batch.bad)
    assert report.total == 4 and report.counts == {UNREADABLE_IMAGE: 1}


def test_loader_with_sampler_drops_bad_images_without_duplicates(folder):
    ds = read_table(folder / "data.csv").with_transforms(to_tensor)
    sampler = CaptionGroupedBatchSampler(ds, batch_size=4, seed=0, drop_last=False)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    report = BadDataReport()
    seen = []
    for batch in loader:
        assert len(set(batch.indices.tolist())) == len(batch)
        report.record_batch(len(batch), batch.bad)
        seen += batch.indices.tolist()
    assert sorted(seen) == [*range(10), 12] and report.total == 13
    assert report.counts == {UNREADABLE_IMAGE: 2}  # big.png is under the default pixel limit


def test_decode_and_check_classify_problems(folder, monkeypatch):
    with pytest.raises(BadImageError) as info:
        decode_image(folder / "absent.png")
    assert info.value.kind == MISSING_FILE
    check_image(folder / "truncated.jpg", "header")  # the header is intact: header mode passes
    with pytest.raises(BadImageError) as info:
        check_image(folder / "truncated.jpg", "decode")
    assert info.value.kind == UNREADABLE_IMAGE
    with pytest.raises(BadImageError) as info:
        check_image(folder / "text.jpg", "header")
    assert info.value.kind == UNREADABLE_IMAGE
    monkeypatch.setattr(clipcraft.images, "MAX_IMAGE_PIXELS", 1000)
    for mode in ("header", "decode"):
        with pytest.raises(BadImageError) as info:
            check_image(folder / "big.png", mode)
        assert info.value.kind == TOO_LARGE
    buf = io.BytesIO()
    Image.new("LA", (4, 4)).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).mode == "RGB"


def test_validate_counts_rows_and_raises_over_the_threshold(folder, monkeypatch):
    ds = read_table(folder / "data.csv")
    header = validate(ds, max_bad_fraction=0.5, check_images="header")
    assert header.counts == {UNREADABLE_IMAGE: 2} and header.total == 26  # text.jpg: 2 captions
    assert not ds.report  # validate works on a copy
    monkeypatch.setattr(clipcraft.images, "MAX_IMAGE_PIXELS", 200 * 200)
    with pytest.raises(BadDataError) as info:
        validate(ds, check_images="decode")
    report = info.value.report
    assert report.counts == {UNREADABLE_IMAGE: 4, TOO_LARGE: 2}
    assert "over the 5.00% limit" in str(info.value) and "truncated.jpg" in str(info.value)
    assert validate(ds.subset(range(10)), check_images="decode").num_bad == 0


def test_validate_sees_files_removed_after_indexing(tmp_path):
    records = [CaptionRecord(str(tmp_path / f"{i}.png"), ("c",)) for i in range(40)]
    for r in records:
        Image.new("RGB", (3, 3)).save(r.image)
    report = BadDataReport("mem")
    report.seen(40)
    ds = CaptionDataset(records, report=report)
    Path(records[0].image).unlink()
    assert validate(ds, check_images="none").counts == {MISSING_FILE: 1}  # 1/40 is under 5%
    Path(records[1].image).unlink()
    Path(records[2].image).unlink()
    with pytest.raises(BadDataError):
        validate(ds, check_images="none")
