"""`clipcraft data shards`: conversion to WebDataset shards with the webdataset library, read back in full."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipcraft.cli import main
from clipcraft.data.report import EMPTY_CAPTION, MISSING_FILE, UNREADABLE_IMAGE
from clipcraft.data.shards import read_manifest, sha256_of, write_shards
from clipcraft.errors import ClipcraftError


def _table(folder: Path, images: int = 7) -> Path:
    """A JSONL table: `images` good images with 1-3 captions each, plus a missing image, a non-image file and
    an empty caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(images):
        fmt, suffix = [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp")][i % 3]
        Image.new("RGB", (40 + i, 30), (i * 30, 100, 200 - i * 20)).save(folder / f"im{i}.{suffix}", fmt)
        rows += [
            {"image": f"im{i}.{suffix}", "caption": f"picture {i} caption {c}"} for c in range(1 + i % 3)
        ]
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    rows += [
        {"image": "broken.jpg", "caption": "a broken file"},
        {"image": "gone.jpg", "caption": "a missing file"},
        {"image": "im0.jpg", "caption": "   "},
    ]
    table = folder / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


def _read_back(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def test_round_trip_every_sample_and_caption_back_bad_rows_reported(tmp_path: Path) -> None:
    table = _table(tmp_path / "src")
    out = tmp_path / "shards"
    manifest = write_shards(table, out, samples_per_shard=3)
    samples = _read_back(out)
    assert len(samples) == 7 == manifest.num_samples
    assert [s.samples for s in manifest.shards] == [3, 3, 1]  # record 7 (broken.jpg) left out of shard 2
    for key, members in samples.items():
        meta = json.loads(members["json"])
        i = int(Path(meta["path"]).stem[2:])
        assert meta["captions"] == [f"picture {i} caption {c}" for c in range(1 + i % 3)]
        assert members["txt"].decode() == meta["captions"][0]
        source = Path(meta["path"])
        if source.suffix == ".bmp":  # not a web format: re-encoded as JPEG
            assert "jpg" in members and "bmp" not in members
        else:
            assert members[source.suffix.lstrip(".")] == source.read_bytes()  # kept byte for byte
        assert key == f"{meta['record']:09d}"
    counts = manifest.report["counts"]
    assert counts == {UNREADABLE_IMAGE: 1, MISSING_FILE: 1, EMPTY_CAPTION: 1}
    assert any(b["kind"] == UNREADABLE_IMAGE and "broken.jpg" in b["where"] for b in manifest.bad)
    for info in manifest.shards:
        assert sha256_of(out / info.name) == info.sha256
    assert read_manifest(out).to_dict() == manifest.to_dict()


def test_rerun_keeps_finished_shards_and_redoes_only_the_missing_one(tmp_path: Path) -> None:
    table = _table(tmp_path / "src")
    out = tmp_path / "shards"
    first = write_shards(table, out, samples_per_shard=3)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    (out / "shard-000001.tar").unlink()  # as if the job was killed while writing it
    again = write_shards(table, out, samples_per_shard=3)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == stamps["shard-000000.tar"]  # not redone
    assert (out / "shard-000002.tar").stat().st_mtime_ns == stamps["shard-000002.tar"]
    assert again.to_dict() | {"seconds": 0} == first.to_dict() | {"seconds": 0}  # same shards, same bytes
    with pytest.raises(ClipcraftError, match="other settings"):
        write_shards(table, out, samples_per_shard=4)


def test_cli_writes_resized_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = _table(tmp_path / "src", images=3)
    out = tmp_path / "small"
    assert main(["data", "shards", "--data", str(table), "--out", str(out), "--resize", "16"]) == 0
    assert "Wrote 1 shard(s), 3 samples" in capsys.readouterr().out
    import io

    for members in _read_back(out).values():
        assert min(Image.open(io.BytesIO(members["jpg"])).size) == 16
