"""Training streamed from WebDataset shards: exact resume in resampled mode, and two gloo processes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from clipcraft.data.shards import write_shards
from clipcraft.demo import write_scene_dataset
from clipcraft.model import load
from clipcraft.train import train
from clipcraft.train.checkpoint import load_checkpoint
from clipcraft.train.config import TrainConfig
from conftest import step_rows, tiny_train_config, train_in_two_gloo_processes


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 training scenes in 4 shards of 6 (with the manifest that gives the epoch's size)."""
    scenes = write_scene_dataset(tmp_path_factory.mktemp("scenes"), train=24, val=8, test=8, seed=3)
    out = tmp_path_factory.mktemp("shards")
    write_shards(scenes, out, samples_per_shard=6, split="train")
    return out


def _config(data: str | Path, out: Path, **overrides: Any) -> TrainConfig:
    return tiny_train_config(data, out, **{"num_workers": 2, "shuffle_buffer": 5, **overrides})


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return step_rows(run_dir)


def _same_weights(a: Path, b: Path, exact: bool = True) -> None:
    wa, wb = load(a).state_dict(), load(b).state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        if exact:
            assert torch.equal(wa[name], wb[name]), name
        else:
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resampled_stream_resume_mid_epoch_is_bit_exact(shards: Path, tmp_path: Path) -> None:
    """Resampled mode, 2 loader workers, buffer shuffle, augmentation: stopping at step 5 (mid-epoch 2, at a
    batch of worker 1) and resuming reaches the weights and losses of the uninterrupted run, bit for bit."""
    spec = str(shards / "shard-{000000..000003}.tar")
    common = {"resampled": True, "train_num_samples": 16}  # 4 steps an epoch
    straight = train(_config(spec, tmp_path / "straight", **common))
    assert straight.steps == 8
    stopped = train(_config(spec, tmp_path / "resumed", max_steps=5, **common))
    saved = load_checkpoint(tmp_path / "resumed")
    assert saved["stream"] == {
        "seed": 0,
        "epoch": 1,
        "batches_seen": 1,
        "samples_seen": 4,
        "batch_size": 4,
        "world_size": 1,
        "num_workers": 2,
        "resampled": True,
        "deterministic": False,
    }
    assert stopped.steps == 5
    resumed = train(_config(spec, tmp_path / "resumed", **common), resume=tmp_path / "resumed")
    assert resumed.steps == 8
    _same_weights(straight.last_model, resumed.last_model)
    assert [(r["step"], r["loss"]) for r in _rows(resumed.run_dir)] == [
        (r["step"], r["loss"]) for r in _rows(straight.run_dir)
    ]
    from clipcraft.errors import ClipcraftError

    with pytest.raises(ClipcraftError, match="num_workers"):
        train(_config(spec, tmp_path / "resumed", num_workers=1, **common), resume=tmp_path / "resumed")


def test_epoch_order_stream_from_the_manifest_and_two_weighted_sources(shards: Path, tmp_path: Path) -> None:
    folder = train(_config(str(shards), tmp_path / "folder", epochs=1, num_workers=0))
    assert folder.steps == 24 // 4  # the epoch's size comes from manifest.json
    both = f"{shards}/shard-00000{{0..1}}.tar::{shards}/shard-00000{{2..3}}.tar"
    weighted = train(
        _config(both, tmp_path / "w", epochs=1, data_weights=[1, 3], resampled=True, train_num_samples=8)
    )
    assert weighted.steps == 2 and _rows(weighted.run_dir)[-1]["loss"] > 0


def test_two_gloo_processes_from_shards_match_one_process_with_the_global_batch(
    shards: Path, tmp_path: Path
) -> None:
    """torchrun, 2 gloo processes x 4 pairs from streamed shards (deterministic stream: every rank reads the
    global batch and keeps its half) train like 1 process x 8 pairs; both ranks take the same number of steps;
    only rank 0 writes."""
    spec = str(shards / "shard-{000000..000003}.tar")
    common = {
        "epochs": 1,
        "stream_deterministic": True,
        "resampled": True,
        "train_num_samples": 32,
        "model_overrides": {"head.dropout": 0.0},
    }
    single = train(_config(spec, tmp_path / "single", batch_size=8, **common))
    assert train_in_two_gloo_processes(_config(spec, tmp_path / "ddp", batch_size=4, **common), tmp_path) == [
        4,
        4,
    ]
    steps = _rows(tmp_path / "ddp")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one line per step: only rank 0 wrote
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in _rows(single.run_dir)], rel=1e-4)
    _same_weights(tmp_path / "ddp" / "last", single.last_model, exact=False)


# -- the caption-keyed text feature cache of streamed shards ---------------------------------------------------


def _sample_captions(spec: str) -> dict[int, tuple[str, ...]]:
    """Every sample's captions by sample id, read straight from the shards."""
    from clipcraft.data.webdataset import RawSample, iter_shard, list_shards

    return {
        s.sample_id: s.captions
        for number, url in enumerate(list_shards(spec))
        for s in iter_shard(url, number)
        if isinstance(s, RawSample)
    }


def test_cached_caption_features_from_shards_train_like_the_text_tower_every_step(
    shards: Path, tmp_path: Path
) -> None:
    """The fast path against the simple one: a locked text tower cached by caption (2 loader workers look up
    the rows) gives the losses and weights of the same streamed run that runs the tower every step."""
    spec = str(shards / "shard-{000000..000003}.tar")
    common = {"lock_text": True, "epochs": 1}  # epoch order: 6 steps from the manifest
    cached = train(_config(spec, tmp_path / "cached", **common))
    plain = train(_config(spec, tmp_path / "plain", feature_cache=False, **common))
    folders = list((tmp_path / "cached" / "feature-cache").glob("captions-*"))
    assert len(folders) == 1 and not (tmp_path / "plain" / "feature-cache").exists()
    distinct = {c for captions in _sample_captions(spec).values() for c in captions}
    assert len(_sample_captions(spec)) == 24 and 24 < len(distinct) < 24 * 3  # some scenes repeat
    assert json.loads((folders[0] / "meta.json").read_text())["rows"] == len(distinct)  # each encoded once
    losses = [r["loss"] for r in _rows(cached.run_dir)]
    assert len(losses) == 6
    assert losses == pytest.approx([r["loss"] for r in _rows(plain.run_dir)], rel=1e-5, abs=1e-6)
    _same_weights(cached.last_model, plain.last_model, exact=False)


def test_the_caption_cache_is_read_again_not_rebuilt(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = str(shards / "shard-{000000..000003}.tar")
    common = {"lock_text": True, "epochs": 1, "max_steps": 2, "cache_dir": str(tmp_path / "cache")}
    first = train(_config(spec, tmp_path / "first", **common))
    built = sorted((tmp_path / "cache").iterdir())
    assert "text features of 48 captions cached in" in capsys.readouterr().out  # 24 scenes, 72 captions

    def no_encoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the text tower encoded captions again")

    monkeypatch.setattr("clipcraft.train.features.encode_texts", no_encoding)
    again = train(_config(spec, tmp_path / "again", **common))
    assert sorted((tmp_path / "cache").iterdir()) == built and len(built) == 1
    assert [r["loss"] for r in _rows(again.run_dir)] == [r["loss"] for r in _rows(first.run_dir)]
    assert "text features of 48 captions read from" in capsys.readouterr().out


def test_two_captions_per_image_from_shards_take_consecutive_captions_that_rotate_over_epochs(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """captions_per_image=2 from shards: each image's two rows are two distinct captions of its own sample,
    the epoch's one and the next (wrapping around its three), and the first one changes between epochs."""
    import numpy as np

    from clipcraft.train import loop
    from clipcraft.train.features import caption_keys

    spec = str(shards / "shard-{000000..000003}.tar")
    seen: list[tuple[int, list[int]]] = []  # (sample id, its two rows), batch after batch
    collate = loop._StreamCollate.__call__

    def spy(self: Any, numbered: Any) -> Any:
        number, (batch, rows) = collate(self, numbered)
        seen.extend((int(i), r.tolist()) for i, r in zip(batch.indices, rows, strict=True))
        return number, (batch, rows)

    monkeypatch.setattr(loop._StreamCollate, "__call__", spy)
    result = train(_config(spec, tmp_path / "k2", lock_text=True, captions_per_image=2, num_workers=0))
    losses = [r["loss"] for r in _rows(result.run_dir)]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert len(seen) == 2 * 24 and all(len(rows) == 2 for _, rows in seen)  # each sample once an epoch

    keys = np.load(next((tmp_path / "k2" / "feature-cache").glob("captions-*")) / "keys.npy")
    captions = _sample_captions(spec)
    firsts: dict[int, set[int]] = {}
    for sample, rows in seen:
        own = list(caption_keys(captions[sample]))  # the sample's three captions, in stored order
        first, second = (own.index(k) for k in keys[rows])  # both captions are the sample's own
        assert second == (first + 1) % len(own)
        firsts.setdefault(sample, set()).add(first)
    assert any(len(f) == 2 for f in firsts.values())  # the draw rotates with the epoch


def test_a_caption_missing_from_the_cache_is_a_clear_error(shards: Path, tmp_path: Path) -> None:
    """Shards behind a pipe: command are keyed by the command alone: when their captions change after the
    cache was built, the lookup refuses the unknown caption instead of using a wrong feature."""
    import shutil
    import tarfile

    from clipcraft.errors import ClipcraftError

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    spec = f"pipe:cat {copy}/shard-{{000000..000003}}.tar"
    common = {"lock_text": True, "epochs": 1, "num_workers": 0, "train_num_samples": 24}
    common["cache_dir"] = str(tmp_path / "cache")
    train(_config(spec, tmp_path / "before", max_steps=1, **common))

    shard = copy / "shard-000002.tar"  # one sample's captions change
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    name, blob = next((m.name, b) for m, b in members if m.name.endswith(".json"))
    meta = json.loads(blob)
    meta["captions"] = [f"a purple hexagon nobody cached ({j})" for j in range(len(meta["captions"]))]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = json.dumps(meta).encode() if member.name == name else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ClipcraftError, match="not in the text feature cache") as error:
        train(_config(spec, tmp_path / "after", **common))
    assert "'a purple hexagon nobody cached (" in str(error.value) and "shard-000002.tar" in str(error.value)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the same key: read, not rebuilt


def test_two_gloo_processes_share_the_caption_cache_and_match_one_process(
    shards: Path, tmp_path: Path
) -> None:
    """Under torchrun rank 0 builds the caption cache and rank 1 waits and reads it (one folder); with two
    cached captions per image the 2 x 4 deterministic run trains like 1 x 8."""
    spec = str(shards / "shard-{000000..000003}.tar")
    common = {
        "epochs": 1,
        "lock_text": True,
        "captions_per_image": 2,
        "stream_deterministic": True,
        "resampled": True,
        "train_num_samples": 16,
        "num_workers": 1,
        "model_overrides": {"head.dropout": 0.0},
    }
    single = train(_config(spec, tmp_path / "single", batch_size=8, **common))
    assert train_in_two_gloo_processes(_config(spec, tmp_path / "ddp", batch_size=4, **common), tmp_path) == [
        2,
        2,
    ]
    assert len(list((tmp_path / "ddp" / "feature-cache").glob("captions-*"))) == 1
    losses = [r["loss"] for r in _rows(tmp_path / "ddp")]
    assert losses == pytest.approx([r["loss"] for r in _rows(single.run_dir)], rel=1e-4)
    _same_weights(tmp_path / "ddp" / "last", single.last_model, exact=False)
