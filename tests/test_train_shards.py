"""Training streamed from WebDataset shards: exact resume in resampled mode, and two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 training scenes in 4 shards of 6 (with the manifest that gives the epoch's size)."""
    scenes = write_scene_dataset(tmp_path_factory.mktemp("scenes"), train=24, val=8, test=8, seed=3)
    out = tmp_path_factory.mktemp("shards")
    write_shards(scenes, out, samples_per_shard=6, split="train")
    return out


def _config(data: str, out: Path, **overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "model": "tiny",
        "data": data,
        "output_dir": str(out),
        "epochs": 2,
        "batch_size": 4,
        "num_workers": 2,
        "shuffle_buffer": 5,
        "warmup_steps": 2,
        "lr_image_tower": 1e-3,
        "lr_text_tower": 1e-3,
        "log_every": 1,
        "example_sheet": False,
        "precision": "fp32",
        "model_overrides": {"head.dropout": 0.1},  # dropout draws from the RNG: resume must restore it
    }
    base.update(overrides)
    return TrainConfig.from_dict(base)


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "step"]


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
    config = _config(spec, tmp_path / "ddp", batch_size=4, **common)
    (tmp_path / "ddp.json").write_text(json.dumps(config.to_dict()))
    code = (
        "import json, sys; from clipcraft.train.config import TrainConfig; from clipcraft.train import train; "
        "import os; r = train(TrainConfig.from_dict(json.load(open(sys.argv[1])))); "
        "open(sys.argv[2] + os.environ['RANK'], 'w').write(str(r.steps))"
    )
    script = tmp_path / "run_ddp.py"
    script.write_text(code.replace("; ", "\n"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
         "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(script), str(tmp_path / "ddp.json"), str(tmp_path / "steps-")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"steps-{r}").read_text() for r in (0, 1)] == ["4", "4"]  # every rank: 4 steps
    steps = _rows(tmp_path / "ddp")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one line per step: only rank 0 wrote
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in _rows(single.run_dir)], rel=1e-4)
    _same_weights(tmp_path / "ddp" / "last", single.last_model, exact=False)
