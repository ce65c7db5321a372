"""WebDataset tar shards read through the webdataset library: shard lists, samples, bad samples, rank/worker
splitting, pipe: and fsspec URLs, and the training batches (fixed steps, resampling, weights, resume)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clipcraft.data import BadItem, CaptionCollate, CaptionItem, WebDatasetStream, expand_braces, list_shards
from clipcraft.data import webdataset as wds
from clipcraft.data.report import (
    BAD_ENCODING,
    BAD_SHARD,
    EMPTY_CAPTION,
    INCOMPLETE_SAMPLE,
    MISSING_FILE,
    UNREADABLE_IMAGE,
)
from clipcraft.errors import ClipcraftError


def _encoded(color: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


def _shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _good_shards(folder: Path, num_shards: int, per_shard: int) -> list[Path]:
    shards = []
    for s in range(num_shards):
        members = []
        for i in range(per_shard):
            key = f"s{s}_{i:03d}"
            members += [
                (f"{key}.jpg", _encoded((s * 40, i * 10, 0))),
                (f"{key}.txt", f"shard {s}, item {i}".encode()),
            ]
        shards.append(_shard(folder / f"shards-{s:03d}.tar", members))
    return shards


def test_expand_braces():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{1..3}") == ["1", "2", "3"]
    assert expand_braces("x{a,b}-{0..1}") == ["xa-0", "xa-1", "xb-0", "xb-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_list_shards_from_folder_file_and_pattern(tmp_path):
    shards = _good_shards(tmp_path, 3, 1)
    (tmp_path / "notes.txt").write_text("not a shard")
    shards = [str(s) for s in shards]
    assert list_shards(tmp_path) == shards
    assert list_shards(shards[1]) == [shards[1]]
    assert list_shards(str(tmp_path / "shards-{000..001}.tar")) == shards[:2]
    assert list_shards(str(tmp_path / "shards-00*.tar")) == shards
    both = f"{tmp_path}/shards-000.tar::{tmp_path}/shards-{{001..002}}.tar"
    assert list_shards(both) == shards and WebDatasetStream(both).sources == [shards[:1], shards[1:]]
    assert list_shards("pipe:cat s-{0..1}.tar") == ["pipe:cat s-0.tar", "pipe:cat s-1.tar"]
    with pytest.raises(ClipcraftError):
        list_shards(tmp_path / "nowhere")


def test_stream_yields_decoded_items_in_order(tmp_path):
    _good_shards(tmp_path, 2, 3)
    stream = WebDatasetStream(tmp_path, shuffle=False, transform=lambda im: torch.tensor(im.size))
    items = list(stream)
    assert all(isinstance(it, CaptionItem) for it in items)
    assert [it.caption for it in items[:2]] == ["shard 0, item 0", "shard 0, item 1"]
    assert items[0].image.tolist() == [8, 8]
    ids = [it.index for it in items]
    assert len(set(ids)) == 6 and ids[3] == 1 << 32  # shard 1, position 0
    assert stream.report.total == 6 and not stream.report


def test_bad_samples_and_shards_are_counted_by_kind(tmp_path):
    full_jpeg = io.BytesIO()
    Image.effect_noise((128, 128), 80).convert("RGB").save(full_jpeg, format="JPEG")
    truncated_jpeg = full_jpeg.getvalue()[: len(full_jpeg.getvalue()) // 2]  # header intact, data cut
    _shard(
        tmp_path / "shards-000.tar",
        [
            ("a.jpg", _encoded((255, 0, 0))),
            ("a.txt", b"good one"),
            ("b.jpg", _encoded((0, 255, 0))),  # no caption
            ("c.txt", b"caption without image"),
            ("d.png", _encoded((0, 0, 255), "PNG")),
            ("d.txt", b"caf\xe9"),  # not UTF-8
            ("e.webp", _encoded((9, 9, 9), "WEBP")),
            ("e.txt", b"   "),
            ("f.jpg", truncated_jpeg),
            ("f.txt", b"truncated image"),
            ("g.jpg", b"this is text, not a jpeg"),
            ("g.txt", b"fake image"),
            ("h.jpeg", _encoded((5, 5, 5))),
            ("h.txt", "caf\u00e9 ok".encode()),
        ],
    )
    noise = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(noise, format="PNG")
    first = [("k0.jpg", _encoded((7, 7, 7))), ("k0.txt", b"before the cut")]
    whole = _shard(tmp_path / "shards-001.tar", [*first, ("k1.png", noise.getvalue()), ("k1.txt", b"lost")])
    cut = len(_shard(tmp_path / "head.tar", first).read_bytes()) - 1024 + 512 + 100  # inside k1.png's data
    whole.write_bytes(whole.read_bytes()[:cut])
    (tmp_path / "shards-002.tar").write_bytes(b"definitely not a tar archive" * 40)
    stream = WebDatasetStream(str(tmp_path / "shards-{000..003}.tar"), shuffle=False)
    items = list(stream)
    good = [it for it in items if isinstance(it, CaptionItem)]
    assert [it.caption for it in good] == ["good one", "café ok", "before the cut"]
    assert stream.report.counts == {
        INCOMPLETE_SAMPLE: 2,
        BAD_ENCODING: 1,
        EMPTY_CAPTION: 1,
        UNREADABLE_IMAGE: 2,
        BAD_SHARD: 2,
        MISSING_FILE: 1,  # shards-003.tar from the pattern
    }
    assert sum(isinstance(it, BadItem) for it in items) == stream.report.num_bad
    # a header-only scan cannot see the truncated JPEG; a full decode can
    header = stream.scan("header")
    assert header.counts[UNREADABLE_IMAGE] == 1
    assert stream.scan("decode").counts[UNREADABLE_IMAGE] == 2


def _keys(stream: WebDatasetStream) -> list[int]:
    return [it.index for it in stream if isinstance(it, CaptionItem)]


def test_shards_are_split_across_ranks_and_workers(tmp_path, monkeypatch):
    _good_shards(tmp_path, 7, 2)
    everything = sorted(_keys(WebDatasetStream(tmp_path, shuffle=False)))
    world, workers = 2, 2
    for epoch in (0, 1):
        parts = []
        for rank in range(world):
            for worker in range(workers):
                info = SimpleNamespace(num_workers=workers, id=worker)
                monkeypatch.setattr(wds, "get_worker_info", lambda info=info: info)
                stream = WebDatasetStream(tmp_path, seed=1, rank=rank, world_size=world)
                stream.set_epoch(epoch)
                parts.append(_keys(stream))
        flat = [k for part in parts for k in part]
        assert sorted(flat) == everything  # every sample exactly once per epoch
        assert all(len(p) % 2 == 0 for p in parts)  # whole shards go to one worker
    one = WebDatasetStream(tmp_path, seed=1)
    assert one.shard_order(0) == one.shard_order(0)
    assert one.shard_order(0) != one.shard_order(1)


def test_buffer_shuffle_is_deterministic_and_keeps_every_sample(tmp_path):
    _good_shards(tmp_path, 2, 10)
    a = _keys(WebDatasetStream(tmp_path, shuffle=False, shuffle_buffer=8, seed=3))
    b = _keys(WebDatasetStream(tmp_path, shuffle=False, shuffle_buffer=8, seed=3))
    plain = _keys(WebDatasetStream(tmp_path, shuffle=False))
    assert a == b and sorted(a) == sorted(plain) and a != plain


def test_dataloader_with_workers_drops_and_reports_bad_items(tmp_path):
    _good_shards(tmp_path, 2, 4)
    _shard(tmp_path / "shards-002.tar", [("x.jpg", b"junk"), ("x.txt", b"junk image")])
    stream = WebDatasetStream(tmp_path, transform=lambda im: torch.zeros(3, 4, 4))
    loader = DataLoader(stream, batch_size=4, num_workers=2, collate_fn=CaptionCollate(len))
    batches = list(loader)
    assert sum(len(b) for b in batches) == 8
    assert all(b.images.shape[1:] == (3, 4, 4) and b.tokens == len(b.captions) for b in batches)
    bad = [item for b in batches for item in b.bad]
    assert [item.kind for item in bad] == [UNREADABLE_IMAGE]


def test_pipe_commands_and_fsspec_urls_read_like_local_files(tmp_path):
    import fsspec

    shards = _good_shards(tmp_path, 2, 3)
    local = [it.caption for it in WebDatasetStream(tmp_path, shuffle=False)]
    piped = WebDatasetStream(f"pipe:cat {tmp_path}/shards-{{000..001}}.tar", shuffle=False)
    assert [it.caption for it in piped] == local
    for shard in shards:
        with fsspec.open(f"memory://wds-test/{shard.name}", "wb") as fh:
            fh.write(shard.read_bytes())
    remote = WebDatasetStream("memory://wds-test/shards-{000..001}.tar", shuffle=False)
    assert [it.caption for it in remote] == local
    failing = WebDatasetStream("pipe:cat /nonexistent/shard.tar", shuffle=False)
    assert list(failing)[0].kind == BAD_SHARD  # the command's exit status is reported, not raised


def _batches(stream, plan, start=0, workers=0, epoch=0, weights=None):
    from clipcraft.data.webdataset import ShardBatches, in_order

    batches = ShardBatches(stream, plan, weights=weights)
    batches.set_epoch(epoch, start)
    loader = DataLoader(batches, batch_size=None, num_workers=workers, collate_fn=lambda x: x)
    return list(in_order(iter(loader), start))


@pytest.mark.parametrize("resampled", [False, True])
def test_stream_batches_resume_mid_epoch_bit_exact(tmp_path, resampled):
    """Starting an epoch at batch 3 (what a resume does) gives exactly batches 3.. of the whole epoch, with
    two workers (batches interleave across them) and random augmentation."""
    from torchvision import transforms

    from clipcraft.data.webdataset import StreamPlan

    _good_shards(tmp_path, 4, 5)
    crop = transforms.Compose([transforms.RandomResizedCrop(4, scale=(0.2, 1.0)), transforms.PILToTensor()])
    plan = StreamPlan(steps=7, batch_size=3, world_size=1, num_workers=2, resampled=resampled, seed=5)

    def stream():
        return WebDatasetStream(tmp_path, transform=crop, shuffle_buffer=4, seed=5)

    whole = _batches(stream(), plan, workers=2, epoch=1)
    resumed = _batches(stream(), plan, start=3, workers=2, epoch=1)
    assert len(whole) == 7 and all(len(b) == 3 for b in whole)
    assert len(resumed) == 4
    for a, b in zip(whole[3:], resumed, strict=True):
        assert [x.index for x in a] == [x.index for x in b] and [x.caption for x in a] == [
            x.caption for x in b
        ]
        assert all(torch.equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    other_epoch = _batches(stream(), plan, workers=2, epoch=2)
    assert [x.index for b in other_epoch for x in b] != [x.index for b in whole for x in b]


def test_stream_batches_fixed_steps_on_every_rank_and_weighted_sources(tmp_path):
    from clipcraft.data.webdataset import StreamPlan

    _good_shards(tmp_path / "a", 3, 2)
    _good_shards(tmp_path / "b", 2, 9)  # unequal shards: ranks would run dry at different times
    spec = f"{tmp_path}/a::{tmp_path}/b"
    plan = StreamPlan(steps=6, batch_size=4, world_size=2, num_workers=0, resampled=False, seed=0)
    for rank in (0, 1):
        got = _batches(WebDatasetStream(spec, rank=rank, world_size=2), plan)
        assert len(got) == 6 and all(len(b) == 4 for b in got)  # the shards wrap around to fill the quota
    weighted = StreamPlan(steps=5, batch_size=4, world_size=1, num_workers=0, resampled=True, seed=0)
    only_b = _batches(WebDatasetStream(spec), weighted, weights=[0, 1])
    assert {x.index >> 32 for b in only_b for x in b} <= {3, 4}  # shards of source b
    with pytest.raises(ClipcraftError, match="one non-negative weight per"):
        _batches(WebDatasetStream(spec), weighted, weights=[1])
    with pytest.raises(ClipcraftError, match="every worker needs a shard"):
        _batches(WebDatasetStream(tmp_path / "b"), StreamPlan(2, 2, 2, 2, False, 0))
