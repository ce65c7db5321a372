"""The training loop: outputs of a run, exact resume, atomic checkpoints, feature-cache and gradient-accumulation
parity, and distributed data parallel with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clipcraft.demo import COLORS, HELD_OUT, SHAPES, write_scene_dataset
from clipcraft.errors import ClipcraftError
from clipcraft.model import load
from clipcraft.train import train
from clipcraft.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from clipcraft.train.config import TrainConfig
from conftest import tiny_train_config, train_in_two_gloo_processes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scene_dataset(tmp_path_factory.mktemp("scenes"), train=24, val=8, test=8, seed=3)


def _config(data: str | Path, out: Path, **overrides: Any) -> TrainConfig:
    return tiny_train_config(data, out, **overrides)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load(model_dir).state_dict()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def _rows(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _plain_test_recall(model_dir: Path | str, split: Path) -> dict[str, float]:
    """Recall@1 and @5 both ways, recomputed from scratch for a scene split: embed every image and caption,
    rank by cosine similarity, and count a hit when the match is ranked within k (any caption of an image)."""
    rows = [json.loads(line) for line in (split / "metadata.jsonl").read_text().splitlines()]
    owner = np.array([i for i, r in enumerate(rows) for _ in r["text"]])  # caption -> its image
    model = load(model_dir)
    images = model.encode_images([split / r["file_name"] for r in rows], normalize=True)  # (N, D)
    texts = model.encode_texts([c for r in rows for c in r["text"]], normalize=True)  # (M, D)
    sim = images @ texts.T  # (N, M)
    out = {}
    for k in (1, 5):
        i2t = [sum(sim[i] > sim[i][owner == i].max()) < k for i in range(len(rows))]
        t2i = [sum(sim[:, j] > sim[owner[j], j]) < k for j in range(len(owner))]
        out[f"i2t_r{k}"], out[f"t2i_r{k}"] = float(np.mean(i2t)), float(np.mean(t2i))
    return out


def test_a_run_writes_models_metrics_plots_and_summary(scenes: Path, tmp_path: Path) -> None:
    # fp32 so that the plain recomputation of the test recall below sees the same embeddings
    result = train(_config(scenes, tmp_path / "run", example_sheet=True, precision="fp32"))
    run = result.run_dir
    assert result.steps == 2 * (24 // 4) and result.epochs == 2
    for name in ("config.yaml", CHECKPOINT_FILE, "summary.json", "retrieval_examples.png"):
        assert (run / name).is_file(), name
    assert (run / "last" / "model.safetensors").is_file() and (run / "best" / "config.json").is_file()
    assert list(run.glob("*.png")), "no plots"
    steps, epochs = _rows(run, "step"), _rows(run, "epoch")
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert {"val_loss", "i2t_r1", "t2i_r10", "recall_mean"} <= epochs[-1].keys()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_num_images"] == 8
    plain = _plain_test_recall(summary["best_model"] or summary["last_model"], scenes / "test")
    assert {k: summary[f"test_{k}"] for k in plain} == pytest.approx(plain, abs=1e-9)
    assert summary["bad_data"]["before_training"]["bad"] == 0
    # the resolved config round-trips
    import yaml

    assert TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())) == _config(
        scenes, tmp_path / "run", example_sheet=True, precision="fp32"
    )


@pytest.mark.parametrize("stop_at", [3, 6])  # mid-epoch, and exactly at an epoch's end
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(
    scenes: Path, tmp_path: Path, stop_at: int
) -> None:
    straight = train(_config(scenes, tmp_path / "straight"))
    stopped = train(_config(scenes, tmp_path / "resumed", max_steps=stop_at))
    assert stopped.steps == stop_at
    assert load_checkpoint(tmp_path / "resumed")["state"]["step"] == stop_at
    resumed = train(_config(scenes, tmp_path / "resumed"), resume=tmp_path / "resumed")
    assert resumed.steps == straight.steps
    _assert_same(_weights(straight.last_model), _weights(resumed.last_model))
    # the resumed run's log has each step once, with the same losses
    assert [(r["step"], r["loss"]) for r in _rows(resumed.run_dir, "step")] == [
        (r["step"], r["loss"]) for r in _rows(straight.run_dir, "step")
    ]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path: Path, scenes: Path) -> None:
    from clipcraft.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(_config(scenes, tmp_path / "x"), resume=tmp_path / "empty")


def test_a_kill_during_checkpointing_leaves_the_previous_checkpoint_loadable(
    scenes: Path, tmp_path: Path
) -> None:
    """Kill the process many times at random moments of a run that checkpoints every step; the checkpoint on
    disk must always load, and resuming from it must work."""
    run = tmp_path / "run"
    config = _config(scenes, run, epochs=200, checkpoint_every=1, val_split=None)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    code = (
        "import json, sys; from clipcraft.train.config import TrainConfig; from clipcraft.train import train; "
        "c = TrainConfig.from_dict(json.load(open(sys.argv[1]))); "
        "train(c, resume=sys.argv[2] if len(sys.argv) > 2 else None)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seen_steps = []
    for attempt in range(3):
        args = [sys.executable, "-c", code, str(tmp_path / "config.json")]
        if (run / CHECKPOINT_FILE).is_file():
            args.append(str(run))
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (run / CHECKPOINT_FILE).is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        before = load_checkpoint(run)["state"]["step"] if attempt else 0
        while time.monotonic() < deadline:  # wait for progress past the checkpoint we started from
            time.sleep(0.2 + 0.13 * attempt)
            try:
                if load_checkpoint(run)["state"]["step"] > before + 2:
                    break
            except Exception:  # noqa: BLE001 - a half-written file here would be the bug; checked below
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        checkpoint = load_checkpoint(run)  # must load after every kill
        seen_steps.append(checkpoint["state"]["step"])
    assert seen_steps == sorted(seen_steps) and seen_steps[-1] > seen_steps[0], seen_steps


def test_cached_locked_tower_features_give_the_same_training(scenes: Path, tmp_path: Path) -> None:
    """A locked tower (text always; image when not augmented) is run once and cached; training from the cache
    must match training that runs the tower every step."""
    common = {"lock_text": True, "lock_image": True, "augment": False, "epochs": 1}
    cached = train(_config(scenes, tmp_path / "cached", feature_cache=True, **common))
    plain = train(_config(scenes, tmp_path / "plain", feature_cache=False, **common))
    assert any((tmp_path / "cached" / "feature-cache").glob("image-*"))
    assert any((tmp_path / "cached" / "feature-cache").glob("text-*"))
    assert not (tmp_path / "plain" / "feature-cache").exists()
    losses_cached = [r["loss"] for r in _rows(cached.run_dir, "step")]
    losses_plain = [r["loss"] for r in _rows(plain.run_dir, "step")]
    assert losses_cached == pytest.approx(losses_plain, rel=1e-5, abs=1e-6)
    _assert_same(_weights(cached.last_model), _weights(plain.last_model), exact=False)
    # a second run reuses the cache instead of recomputing it
    again = train(_config(scenes, tmp_path / "again", feature_cache=True, cache_dir=str(tmp_path / "cached" / "feature-cache"), **common))  # fmt: skip
    assert [r["loss"] for r in _rows(again.run_dir, "step")] == losses_cached


def test_gradient_accumulation_matches_the_full_batch(scenes: Path, tmp_path: Path) -> None:
    common = {"epochs": 1, "max_steps": 3, "model_overrides": {"head.dropout": 0.0}, "augment": False}
    full = train(_config(scenes, tmp_path / "full", grad_accum_steps=1, **common))
    accum = train(_config(scenes, tmp_path / "accum", grad_accum_steps=2, **common))
    assert [r["loss"] for r in _rows(full.run_dir, "step")] == pytest.approx(
        [r["loss"] for r in _rows(accum.run_dir, "step")], rel=1e-5
    )
    full_ckpt, accum_ckpt = load_checkpoint(full.run_dir), load_checkpoint(accum.run_dir)
    _assert_same(full_ckpt["model"], accum_ckpt["model"], exact=False)


def test_caption_rows_take_k_captions_per_image_wrapping_round_each_images_own_count() -> None:
    import numpy as np

    from clipcraft.train.features import FeatureCache

    # three images with 2, 3 and 1 captions; feature row r holds the value r
    cache = FeatureCache(
        features=np.arange(6, dtype=np.float32)[:, None], ok=np.ones(3, bool), offsets=np.array([0, 2, 5])
    )
    images, first = torch.tensor([1, 0, 2]), torch.tensor([2, 1, 0])
    assert cache.caption_rows(images, first, 1).flatten().tolist() == [4, 1, 5]
    assert cache.caption_rows(images, first, 3).flatten().tolist() == [4, 2, 3, 1, 0, 1, 5, 5, 5]


def test_several_captions_per_step_train_and_accumulate_like_the_full_batch(
    scenes: Path, tmp_path: Path
) -> None:
    """captions_per_image=3 (every scene's three captions in each step, from the text cache): training
    lowers the loss, differs from one caption per step, and gradient accumulation still equals the full
    batch."""
    common = {"lock_text": True, "epochs": 1, "max_steps": 4, "augment": False}
    common["model_overrides"] = {"head.dropout": 0.0}
    one = train(_config(scenes, tmp_path / "one", **common))
    full = train(_config(scenes, tmp_path / "full", captions_per_image=3, **common))
    accum = train(_config(scenes, tmp_path / "accum", captions_per_image=3, grad_accum_steps=2, **common))
    losses = [r["loss"] for r in _rows(full.run_dir, "step")]
    assert losses[-1] < losses[0]
    assert losses != pytest.approx([r["loss"] for r in _rows(one.run_dir, "step")])
    assert losses == pytest.approx([r["loss"] for r in _rows(accum.run_dir, "step")], rel=1e-5)
    _assert_same(load_checkpoint(full.run_dir)["model"], load_checkpoint(accum.run_dir)["model"], exact=False)


def test_several_captions_per_step_without_a_cached_text_tower_is_refused(
    scenes: Path, tmp_path: Path
) -> None:
    with pytest.raises(ClipcraftError, match="captions_per_image=3 needs cached text features"):
        train(_config(scenes, tmp_path / "refused", captions_per_image=3, epochs=1))
    with pytest.raises(ClipcraftError, match="captions_per_image=2 needs cached text features"):
        train(
            _config(scenes, tmp_path / "nocache", captions_per_image=2, lock_text=True, feature_cache=False)
        )
    with pytest.raises(ClipcraftError, match="at least 1"):
        train(_config(scenes, tmp_path / "zero", captions_per_image=0))
    assert not (tmp_path / "nocache" / "feature-cache").exists()  # refused before any work


def test_siglip_loss_and_locked_image_tower_train(scenes: Path, tmp_path: Path) -> None:
    result = train(_config(scenes, tmp_path / "siglip", loss="siglip", lock_image=True, epochs=1))
    first, last = _rows(result.run_dir, "step")[0], _rows(result.run_dir, "step")[-1]
    assert last["loss"] < first["loss"]
    trained, start = load(result.last_model), load_checkpoint(result.run_dir)
    assert torch.equal(trained.logit_bias, start["model"]["logit_bias"])


def test_webdataset_shards_without_a_sample_count_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    import tarfile

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w"):
        pass
    from clipcraft.errors import ClipcraftError

    with pytest.raises(ClipcraftError, match="WebDataset shards .* set train_num_samples"):
        train(_config(shard, tmp_path / "run", data_format="webdataset"))


def test_distributed_two_cpu_processes_match_one_process_with_the_global_batch(
    scenes: Path, tmp_path: Path
) -> None:
    """torchrun with 2 gloo processes x 4 pairs trains like 1 process x 8 pairs: the same images per step
    (the sampler shards each global batch), the gathered loss, averaged gradients. Only rank 0 writes."""
    common = {"epochs": 1, "augment": True, "model_overrides": {"head.dropout": 0.0}}
    single = train(_config(scenes, tmp_path / "single", batch_size=8, **common))
    config = _config(scenes, tmp_path / "ddp", batch_size=4, **common)
    train_in_two_gloo_processes(config, tmp_path)
    steps = _rows(tmp_path / "ddp", "step")
    assert [r["step"] for r in steps] == [1, 2, 3]  # one line per step: only rank 0 wrote
    assert [r["loss"] for r in steps] == pytest.approx(
        [r["loss"] for r in _rows(single.run_dir, "step")], rel=1e-4
    )
    _assert_same(_weights(tmp_path / "ddp" / "last"), _weights(single.last_model), exact=False)


def test_the_demo_trains_evaluates_and_reports(tmp_path: Path) -> None:
    from clipcraft.demo import run_demo

    r = run_demo(
        tmp_path, sizes=(36, 12, 12), model="tiny", epochs=1, batch_size=8, num_workers=0, precision="fp32"
    )
    assert r["test_images"] == 12
    plain = _plain_test_recall(r["model"], tmp_path / "data" / "test")
    assert {k: r[f"test_{k}"] for k in plain} == pytest.approx(plain, abs=1e-9)
    # zero-shot recomputed by hand: each class's prompts averaged, the nearest class per test image
    rows = [
        json.loads(line) for line in (tmp_path / "data" / "test" / "metadata.jsonl").read_text().splitlines()
    ]
    model = load(r["model"])
    classes = [f"{c} {s}" for c in COLORS for s in SHAPES]
    prompts = [t.format(c) for c in classes for t in ("a {}.", "a photo of a {}.", "a drawing of a {}.")]
    class_emb = (
        model.encode_texts(prompts, normalize=True).reshape(len(classes), 3, -1).mean(axis=1)
    )  # (C, D)
    class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
    images = model.encode_images(
        [tmp_path / "data" / "test" / row["file_name"] for row in rows], normalize=True
    )
    predicted = (images @ class_emb.T).argmax(axis=1)  # (N,) the most similar class
    hits = [classes[p] == f"{row['color']} {row['shape']}" for p, row in zip(predicted, rows, strict=True)]
    held = [(row["color"], row["shape"]) in HELD_OUT for row in rows]
    seen_hits = [h for h, o in zip(hits, held, strict=True) if not o]
    held_hits = [h for h, o in zip(hits, held, strict=True) if o]
    assert r["zeroshot_seen_top1"] == pytest.approx(sum(seen_hits) / len(seen_hits))
    assert r["zeroshot_heldout_top1"] == pytest.approx(sum(held_hits) / len(held_hits))
    assert r["zeroshot_chance"] == pytest.approx(1 / 18)
    assert Path(r["model"], "model.safetensors").is_file()
    assert json.loads(Path(r["run_dir"], "demo.json").read_text())["test_images"] == 12
    assert any(f.endswith("retrieval_examples.png") for f in r["figures"])


@pytest.mark.parametrize("name", ["seed.yaml", "flickr8k-minilm-vit-tiny.yaml"])
def test_shipped_configs_are_valid_train_configs(name: str) -> None:
    from clipcraft.config import load_config_file

    config = TrainConfig.from_dict(load_config_file(Path(__file__).parents[1] / "configs" / name))
    if name == "seed.yaml":
        assert config.model == "seed" and config.lr_heads == 1e-3 and config.optim.epochs == 5
        assert config.lr_image_tower == config.lr_text_tower == 1e-5  # each tower its own rate
    else:
        assert config.lock_text and config.data.endswith("flickr8k")
        assert config.captions_per_image > 1 and config.feature_cache  # k captions need the text cache


def _copy_scenes(scenes: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(scenes, dest)
    return dest


def test_a_few_bad_images_are_skipped_counted_and_reported(scenes: Path, tmp_path: Path) -> None:
    data = _copy_scenes(scenes, tmp_path / "data")
    victim = sorted((data / "train").glob("*.png"))[0]
    victim.write_bytes(b"not an image at all")  # 1 of 24 images: under the 5 % threshold
    result = train(_config(data, tmp_path / "run", epochs=1, check_images="decode"))
    report = json.loads((result.run_dir / "summary.json").read_text())["bad_data"]["before_training"]
    assert report["bad"] == 3  # the image's 3 caption rows
    assert report["counts"] == {"unreadable_image": 3}
    assert victim.name in report["examples"][0]["where"]


def test_too_much_bad_data_fails_before_training_with_the_report(scenes: Path, tmp_path: Path) -> None:
    from clipcraft.data import BadDataError

    data = _copy_scenes(scenes, tmp_path / "data")
    for victim in sorted((data / "train").glob("*.png"))[:3]:  # 3 of 24 images: 12.5 %
        victim.unlink()
    with pytest.raises(BadDataError, match="missing_file") as info:
        train(_config(data, tmp_path / "run"))
    assert info.value.report.num_bad == 9
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()


def test_patch_dropout_trains_resumes_exactly_and_stays_out_of_the_saved_model(
    scenes: Path, tmp_path: Path
) -> None:
    straight = train(_config(scenes, tmp_path / "straight", patch_dropout=0.5))
    train(_config(scenes, tmp_path / "resumed", patch_dropout=0.5, max_steps=5))
    resumed = train(_config(scenes, tmp_path / "resumed", patch_dropout=0.5), resume=tmp_path / "resumed")
    _assert_same(_weights(straight.last_model), _weights(resumed.last_model))
    plain = train(_config(scenes, tmp_path / "plain"))
    assert _rows(plain.run_dir, "step")[0]["loss"] != _rows(straight.run_dir, "step")[0]["loss"]
    saved = load(straight.best_model)  # a training setting: the saved model embeds with every patch
    assert isinstance(saved.image_tower.trunk.patch_drop, torch.nn.Identity)
    with pytest.raises(ClipcraftError, match="nothing of it to train"):
        train(_config(scenes, tmp_path / "locked", patch_dropout=0.5, lock_image=True))


def test_channels_last_trains_like_the_default_layout_and_resumes_exactly(
    scenes: Path, tmp_path: Path
) -> None:
    cnn = {"model_overrides": {"image.name": "resnet18d", "image.model_kwargs": {"layers": [1, 1, 1, 1]},
                               "head.dropout": 0.0}, "augment": False}  # fmt: skip
    # The first step's loss agrees (the gradients do too: tests/test_towers.py). Later steps are not compared:
    # Adam's first updates move every weight by about +-lr whatever the size of its gradient, so a near-zero
    # gradient whose sign differs by float rounding between the two memory orders sends its weight the other
    # way, and the losses drift apart by ~1% within three steps.
    plain = train(_config(scenes, tmp_path / "plain", max_steps=1, **cnn))
    nhwc = train(_config(scenes, tmp_path / "nhwc", max_steps=1, channels_last=True, **cnn))
    first = [_rows(run.run_dir, "step")[0]["loss"] for run in (plain, nhwc)]
    torch.testing.assert_close(first[1], first[0], rtol=1e-3, atol=0.0)
    straight = train(_config(scenes, tmp_path / "straight", channels_last=True, **cnn))
    train(_config(scenes, tmp_path / "resumed", channels_last=True, max_steps=5, **cnn))
    resumed = train(
        _config(scenes, tmp_path / "resumed", channels_last=True, **cnn), resume=tmp_path / "resumed"
    )
    _assert_same(_weights(straight.last_model), _weights(resumed.last_model))
    assert load(straight.last_model).image_tower.trunk.conv1[0].weight.is_contiguous()  # saved as default


def test_gradient_checkpointing_gives_the_same_training(scenes: Path, tmp_path: Path) -> None:
    common = {"epochs": 1, "max_steps": 2, "model_overrides": {"head.dropout": 0.0}, "augment": False}
    plain = train(_config(scenes, tmp_path / "plain", **common))
    ckpt = train(_config(scenes, tmp_path / "ckpt", grad_checkpointing=True, **common))
    _assert_same(load_checkpoint(plain.run_dir)["model"], load_checkpoint(ckpt.run_dir)["model"], exact=False)


def test_gradient_checkpointing_is_switched_on_in_both_towers() -> None:
    from clipcraft import create_model

    model = create_model(
        "tiny", overrides={"image.grad_checkpointing": True, "text.grad_checkpointing": True}
    )
    assert model.image_tower.trunk.grad_checkpointing
    assert model.text_tower.model.is_activation_checkpointing


def test_config_sources_take_precedence_in_order(tmp_path: Path) -> None:
    from clipcraft.train.config import gather_config

    (tmp_path / "c.yaml").write_text("epochs: 3\nbatch_size: 8\nseed: 1\n")
    data = gather_config(None, tmp_path / "c.yaml", {"seed": 2, "data": None}, ["batch_size=4"])
    assert data == {"epochs": 3, "batch_size": 4, "seed": 2}


def test_numbers_in_exponent_notation_are_numbers_in_files_and_overrides(tmp_path: Path) -> None:
    from clipcraft.train.config import gather_config

    (tmp_path / "c.yaml").write_text("lr_heads: 3e-4\nlr_logit_scale: 1E-2\n")  # PyYAML: strings
    config = TrainConfig.from_dict(
        gather_config(None, tmp_path / "c.yaml", {}, ["lr_text_tower=1e-5", "eps=2e-8"])
    )
    assert (config.lr_heads, config.lr_logit_scale, config.lr_text_tower, config.optim.eps) == (
        3e-4,
        1e-2,
        1e-5,
        2e-8,
    )
    assert (
        TrainConfig.from_dict(gather_config(None, None, {}, ["lr_logit_scale=null"])).lr_logit_scale is None
    )
    with pytest.raises(ClipcraftError, match="'lr_heads' must be a number, got 'fast'"):
        TrainConfig.from_dict(gather_config(None, None, {}, ["lr_heads=fast"]))


def test_override_sets_one_entry_of_a_mapping_field(tmp_path: Path) -> None:
    from clipcraft.train.config import gather_config

    (tmp_path / "c.yaml").write_text("model_overrides:\n  image.model_kwargs: {img_size: 96}\n")
    overrides = [
        "model_overrides.init_logit_scale=3.5",
        "data_options.image_root=/x",
        "model_overrides.embed_dim=64",
    ]
    data = gather_config(None, tmp_path / "c.yaml", {}, overrides)
    assert data["model_overrides"] == {
        "image.model_kwargs": {"img_size": 96},
        "init_logit_scale": 3.5,
        "embed_dim": 64,
    }
    assert data["data_options"] == {"image_root": "/x"}
    config = TrainConfig.from_dict(data)
    assert config.model_overrides["init_logit_scale"] == 3.5
    with pytest.raises(ClipcraftError, match="Unknown config key"):
        TrainConfig.from_dict(gather_config(None, None, {}, ["optimizer.lr=1"]))


def test_train_command_runs_and_resumes_from_the_run_directory(scenes: Path, tmp_path: Path) -> None:
    from clipcraft.cli import main

    run = tmp_path / "run"
    config = _config(scenes, run, epochs=1).to_dict()
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "c.json"), "max_steps=2"]) == 0
    assert load_checkpoint(run)["state"]["step"] == 2
    assert main(["train", "--resume", str(run), "max_steps=null"]) == 0
    assert load_checkpoint(run)["state"]["step"] == 6


def test_ctrl_c_in_train_says_what_was_saved_and_the_resume_command(
    scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C used to end in a raw KeyboardInterrupt traceback; now: what was saved, and the command."""
    from clipcraft.cli import main
    from clipcraft.train.run import Run

    real = Run.step_done

    def interrupt_at_step_3(self: Run, samples: int) -> None:
        real(self, samples)
        if self.state["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "step_done", interrupt_at_step_3)
    run = tmp_path / "run"
    (tmp_path / "c.json").write_text(json.dumps(_config(scenes, run, epochs=1).to_dict()))
    assert main(["train", "--config", str(tmp_path / "c.json"), "checkpoint_every=2"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "checkpoint at step 2" in err and f"clipcraft train --resume {run}" in err
    monkeypatch.setattr(Run, "step_done", real)
    assert main(["train", "--resume", str(run)]) == 0
    assert load_checkpoint(run)["state"]["step"] == 6


def test_ctrl_c_before_the_first_checkpoint_says_nothing_can_be_resumed(
    scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipcraft.cli import main
    from clipcraft.train.run import Run

    def interrupt(self: Run, samples: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "step_done", interrupt)
    run = tmp_path / "run"
    (tmp_path / "c.json").write_text(json.dumps(_config(scenes, run, epochs=1).to_dict()))
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was written" in err.lower() and "clipcraft train --config" in err


def test_the_locked_text_towers_feature_cache_shows_progress(
    scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Caching 30,000 captions used to run for minutes with no output at all."""
    train(_config(scenes, tmp_path / "run", epochs=1, lock_text=True))
    out, err = capsys.readouterr()
    assert "text features" in err and "100%" in err
    assert "validating on 8 images" in out and "embedding images" in err  # so do validation and test
    assert "testing the best model on 8 images" in out


def test_model_overrides_may_not_set_what_a_training_field_owns(scenes: Path, tmp_path: Path) -> None:
    """Tower locking has one owner, the training fields: a model_overrides entry that sets it used to be
    overwritten silently by lock_image=false."""
    for key, field_name in (("image.lock", "lock_image"), ("text.unlocked_groups", "text_unlocked_groups")):
        with pytest.raises(ClipcraftError, match=field_name):
            train(_config(scenes, tmp_path / "run", model_overrides={key: True}))
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before any work


def test_the_best_model_is_scored_on_the_runs_device(
    scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test split is scored with the best model reloaded onto the run's device, not onto the CPU that
    ``load`` defaults to (on a CUDA run the test split was scored on the CPU)."""
    import clipcraft.train.loop as loop

    real_load, devices = loop.load, []

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        devices.append(kwargs.get("device", args[0] if args else None))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(loop, "load", spy)
    result = train(_config(scenes, tmp_path / "run", epochs=1, device="cpu"))
    assert result.best_model is not None and devices == [torch.device("cpu")]


def test_auto_precision_is_recorded_as_the_precision_that_ran(
    scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With native bf16 (patched: never the host's), auto resolves once to bf16, and the run records bf16
    (and that auto was asked for) in config.yaml, the checkpoint and summary.json."""
    import yaml

    monkeypatch.setattr("clipcraft.precision.cpu_has_native_bf16", lambda: True)
    run = tmp_path / "run"
    result = train(_config(scenes, run, epochs=1, batch_size=8, precision="auto"))
    assert TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())).run.precision == "bf16"
    assert "auto requested, bf16 ran on cpu" in (run / "config.yaml").read_text()
    checkpoint = load_checkpoint(run)
    assert checkpoint["config"]["precision"] == checkpoint["precision"] == "bf16"
    assert checkpoint["precision_requested"] == "auto"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["precision"], summary["precision_requested"], summary["device"]) == (
        "bf16",
        "auto",
        "cpu",
    )
    assert result.steps == 3


def test_open_runtime_resolves_the_device_and_precision_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipcraft.precision import Precision
    from clipcraft.train.runtime import open_runtime, single_process_runtime

    monkeypatch.setattr("clipcraft.precision.cpu_has_native_bf16", lambda: False)
    with open_runtime("cpu", "auto") as rt:
        assert (rt.device, rt.precision, rt.precision_requested) == (
            torch.device("cpu"),
            Precision.FP32,
            "auto",
        )
        assert rt.is_main and not rt.distributed and rt.min_int(5) == 5
    monkeypatch.setattr("clipcraft.precision.cpu_has_native_bf16", lambda: True)
    assert single_process_runtime("cpu", "auto").precision is Precision.BF16
    assert single_process_runtime("cpu", "fp32").precision is Precision.FP32
    with pytest.raises(ClipcraftError, match="precision must be one of"):
        single_process_runtime("cpu", "fp16")


def test_flat_dotted_and_nested_keys_build_the_same_config() -> None:
    flat = TrainConfig.from_dict({"epochs": 2, "seed": 3, "num_workers": 0, "lock_text": True})
    dotted = TrainConfig.from_dict(
        {"optim.epochs": 2, "run.seed": 3, "loader.num_workers": 0, "lock_text": True}
    )
    nested = TrainConfig.from_dict(
        {"optim": {"epochs": 2}, "run": {"seed": 3}, "loader": {"num_workers": 0}, "lock_text": True}
    )
    assert flat == dotted == nested
    assert (flat.optim.epochs, flat.run.seed, flat.loader.num_workers, flat.optim.batch_size) == (2, 3, 0, 64)
    assert TrainConfig.from_dict(flat.to_dict()) == flat and "epochs" in flat.to_dict()


def test_shared_fields_are_declared_once() -> None:
    """Each key a user writes names one field: the job's own or one section's, never both."""
    import dataclasses

    from clipcraft.finetune.config import FinetuneConfig
    from clipcraft.train.config import SECTIONS

    section_fields = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(section_fields) == len(set(section_fields))
    for job in (TrainConfig, FinetuneConfig):
        own = {f.name for f in dataclasses.fields(job)} - set(SECTIONS)
        assert not own & set(section_fields), job
        assert {f.name: f.type for f in dataclasses.fields(job) if f.name in SECTIONS} == {
            "optim": "OptimConfig",
            "loader": "LoaderConfig",
            "run": "RunConfig",
        }


def test_tower_locking_has_one_owner() -> None:
    from clipcraft.train.config import tower_overrides

    assert tower_overrides({"embed_dim": 8}, lock_image=True) == {"embed_dim": 8, "image.lock": True}
    with pytest.raises(ClipcraftError, match="lock_text"):
        tower_overrides({"text": {"lock": True}}, lock_text=False)
    with pytest.raises(ClipcraftError, match="grad_checkpointing"):
        tower_overrides({"image.grad_checkpointing": True})


def test_temperature_settings_and_label_smoothing_reach_the_step(scenes: Path, tmp_path: Path) -> None:
    """The temperature's own rate, a fixed temperature, and label smoothing: each changes what trains."""
    import math

    from clipcraft import create_model
    from clipcraft.losses import ClipLoss, build_loss
    from clipcraft.train.optim import param_groups

    config = _config(scenes, tmp_path / "x", lr_logit_scale=0.05, label_smoothing=0.1)
    rates = config.learning_rates()
    assert rates["logit"] == 0.05 and rates["heads"] == config.lr_heads
    model = create_model("tiny")
    groups = {g["name"]: g for g in param_groups(model, rates, 0.1)}
    assert groups["logit_no_decay"]["lr"] == 0.05 and groups["logit_no_decay"]["weight_decay"] == 0.0

    fixed = train(_config(scenes, tmp_path / "fixed", learn_logit_scale=False, lr_heads=0.05, epochs=1))
    moved = train(_config(scenes, tmp_path / "moved", lr_heads=0.05, epochs=1))
    init = math.log(1 / 0.07)
    assert load(fixed.last_model).logit_scale.item() == pytest.approx(init, abs=1e-7)
    assert abs(load(moved.last_model).logit_scale.item() - init) > 1e-4

    smoothed = train(_config(scenes, tmp_path / "smooth", label_smoothing=0.3, epochs=1))
    plain = train(_config(scenes, tmp_path / "plain", epochs=1))
    first = [r["loss"] for r in _rows(smoothed.run_dir, "step")][0]
    assert first != pytest.approx(_rows(plain.run_dir, "step")[0]["loss"], abs=1e-4)  # the step saw it
    assert isinstance(build_loss("clip", label_smoothing=0.3), ClipLoss)


def test_training_saves_the_average_and_resumes_it_exactly(scenes: Path, tmp_path: Path) -> None:
    straight = train(_config(scenes, tmp_path / "straight", ema_decay=0.9))
    raw = load_checkpoint(straight.run_dir)["model"]
    saved = _weights(straight.last_model)
    ema = load_checkpoint(straight.run_dir)["ema"]["average"]
    moved = [n for n in ema if n in saved and not torch.equal(saved[n], raw[n])]
    assert moved, "the saved model should be the average, not the raw weights"
    for name in moved:
        torch.testing.assert_close(saved[name], ema[name], rtol=0, atol=0)
    stopped = train(_config(scenes, tmp_path / "resumed", ema_decay=0.9, max_steps=3))
    assert stopped.steps == 3
    resumed = train(_config(scenes, tmp_path / "resumed", ema_decay=0.9), resume=tmp_path / "resumed")
    for name, value in _weights(resumed.last_model).items():
        assert torch.equal(value, saved[name]), name
    assert load(straight.last_model).training is False
