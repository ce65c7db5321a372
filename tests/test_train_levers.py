"""Training levers for little data: SLIP's image self-supervision (ssl_weight) and caption augmentation
(text_augment_variants). Each is off by default, changes what trains when on, resumes exactly, and is
refused where it cannot work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clipcraft.data import CaptionDataset, CaptionRecord
from clipcraft.demo import write_scene_dataset
from clipcraft.errors import ClipcraftError
from clipcraft.model import create_model, load
from clipcraft.train import train
from clipcraft.train.checkpoint import load_checkpoint
from clipcraft.train.config import TrainConfig
from conftest import step_rows, tiny_train_config, train_in_two_gloo_processes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scene_dataset(tmp_path_factory.mktemp("scenes"), train=24, val=8, test=8, seed=3)


def _config(data: str | Path, out: Path, **overrides: Any) -> TrainConfig:
    return tiny_train_config(data, out, **overrides)


def _steps(run_dir: Path) -> list[dict[str, Any]]:
    return step_rows(run_dir)


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- SLIP ----------------------------------------------------------------------------------------------------

SSL = {"ssl_weight": 0.5, "ssl_hidden": 32, "ssl_dim": 16}


def test_ssl_trains_resumes_exactly_and_keeps_its_head_out_of_the_saved_model(
    scenes: Path, tmp_path: Path
) -> None:
    straight = train(_config(scenes, tmp_path / "straight", **SSL))
    stopped = train(_config(scenes, tmp_path / "resumed", max_steps=5, **SSL))
    head_at_5 = load_checkpoint(stopped.run_dir)["loss"]
    resumed = train(_config(scenes, tmp_path / "resumed", **SSL), resume=tmp_path / "resumed")
    _assert_equal(load(straight.last_model).state_dict(), load(resumed.last_model).state_dict())
    a, b = load_checkpoint(straight.run_dir), load_checkpoint(resumed.run_dir)
    _assert_equal(a["loss"], b["loss"])  # the SimCLR head resumed too
    _assert_equal(a["model"], b["model"])
    keyed = [(r["step"], r["loss"], r["ssl_loss"]) for r in _steps(straight.run_dir)]
    assert keyed == [(r["step"], r["loss"], r["ssl_loss"]) for r in _steps(resumed.run_dir)]
    # the head trains, at the heads' rate, in the checkpoint and not in the saved model
    assert any(not torch.equal(a["loss"][n], head_at_5[n]) for n in head_at_5)
    assert all(name.startswith("ssl.head.") for name in a["loss"])
    assert _steps(straight.run_dir)[-1]["lr_ssl_head"] == _steps(straight.run_dir)[-1]["lr_heads"]
    assert load(straight.best_model).state_dict().keys() == create_model("tiny").state_dict().keys()
    assert all(r["ssl_loss"] > 0 for r in _steps(straight.run_dir))


def test_ssl_adds_the_weighted_simclr_term_to_the_loss_of_the_usual_crop(
    scenes: Path, tmp_path: Path
) -> None:
    """Without dropout, the first step's image-text loss with SLIP is the plain run's (view 0 is the crop a
    plain run sees, from the same initial weights); the logged loss adds ssl_weight x the SimCLR term."""
    common = {"max_steps": 1, "model_overrides": {"head.dropout": 0.0}}
    plain = _steps(train(_config(scenes, tmp_path / "plain", **common)).run_dir)[0]
    slip = _steps(train(_config(scenes, tmp_path / "slip", **common, **SSL)).run_dir)[0]
    assert slip["loss"] - 0.5 * slip["ssl_loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert slip["ssl_loss"] > 0.1


def test_ssl_with_gradient_accumulation_matches_the_full_batch(scenes: Path, tmp_path: Path) -> None:
    common = {"epochs": 1, "max_steps": 3, "model_overrides": {"head.dropout": 0.0}, **SSL}
    full = train(_config(scenes, tmp_path / "full", grad_accum_steps=1, **common))
    accum = train(_config(scenes, tmp_path / "accum", grad_accum_steps=2, **common))
    for key in ("loss", "ssl_loss"):
        assert [r[key] for r in _steps(full.run_dir)] == pytest.approx([r[key] for r in _steps(accum.run_dir)], rel=1e-5)  # fmt: skip
    a, b = load_checkpoint(full.run_dir), load_checkpoint(accum.run_dir)
    for part in ("model", "loss"):
        for name in a[part]:
            torch.testing.assert_close(a[part][name], b[part][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.distributed
def test_ssl_under_two_cpu_processes_matches_one_process_with_the_global_batch(
    scenes: Path, tmp_path: Path
) -> None:
    """torchrun, 2 gloo processes x 4 images vs 1 process x 8: NT-Xent negatives are gathered from both
    ranks and the SimCLR head's gradients averaged, so losses, weights and the head agree."""
    common = {"epochs": 1, "max_steps": 3, "model_overrides": {"head.dropout": 0.0}, **SSL}
    single = train(_config(scenes, tmp_path / "single", batch_size=8, **common))
    config = _config(scenes, tmp_path / "ddp", batch_size=4, **common)
    train_in_two_gloo_processes(config, tmp_path)
    for key in ("loss", "ssl_loss"):
        assert [r[key] for r in _steps(tmp_path / "ddp")] == pytest.approx([r[key] for r in _steps(single.run_dir)], rel=1e-4)  # fmt: skip
    a, b = load_checkpoint(single.run_dir), load_checkpoint(tmp_path / "ddp")
    for part in ("model", "loss"):
        for name in a[part]:
            torch.testing.assert_close(a[part][name], b[part][name], rtol=1e-4, atol=1e-5, msg=name)


def test_ssl_is_refused_where_it_cannot_work(scenes: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipcraftError, match="nothing of it to train"):
        train(_config(scenes, tmp_path / "locked", lock_image=True, **SSL))
    with pytest.raises(ClipcraftError, match="augment=true"):
        train(_config(scenes, tmp_path / "centre", augment=False, **SSL))
    with pytest.raises(ClipcraftError, match="WebDataset"):
        train(_config(tmp_path / "x.tar", tmp_path / "wds", data_format="webdataset", **SSL))
    with pytest.raises(ClipcraftError, match="ssl_weight must be >= 0"):
        train(_config(scenes, tmp_path / "neg", ssl_weight=-1.0))
    with pytest.raises(ClipcraftError, match="text_augment_strength"):
        train(_config(scenes, tmp_path / "strength", text_augment_variants=2, text_augment_strength=0.0))
    assert not (tmp_path / "locked" / "feature-cache").exists()  # refused before any work


def test_levers_switched_off_leave_training_exactly_as_it_was(scenes: Path, tmp_path: Path) -> None:
    """ssl_weight=0 and text_augment_variants=0 take the old path whatever the other lever fields say."""
    common = {"epochs": 1, "max_steps": 3}
    plain = train(_config(scenes, tmp_path / "plain", **common))
    off = {"ssl_temperature": 0.5, "ssl_hidden": 7, "ssl_dim": 3, "text_augment_strength": 0.9}
    other = train(_config(scenes, tmp_path / "off", **common, **off))
    assert [r["loss"] for r in _steps(plain.run_dir)] == [r["loss"] for r in _steps(other.run_dir)]
    a, b = load_checkpoint(plain.run_dir), load_checkpoint(other.run_dir)
    _assert_equal(a["model"], b["model"])
    assert "loss" not in b and "ssl_loss" not in _steps(other.run_dir)[0]


def test_a_training_item_has_two_views_the_first_the_one_view_crop(scenes: Path) -> None:
    from clipcraft.data import open_dataset
    from clipcraft.train.loop import _TrainItems

    dataset = open_dataset(str(scenes), split="train")
    transform = create_model("tiny").image_transform(train=True)
    one = _TrainItems(dataset, transform, seed=3)[1, 0, 2]
    two = _TrainItems(dataset, transform, seed=3, views=2)[1, 0, 2]
    assert two[0].shape == (2, *one[0].shape)
    assert torch.equal(two[0][0], one[0])
    assert not torch.equal(two[0][1], one[0])
    assert torch.equal(_TrainItems(dataset, transform, seed=3, views=2)[1, 0, 2][0], two[0])  # seeded
    assert not torch.equal(_TrainItems(dataset, transform, seed=3, views=2)[1, 0, 3][0][1], two[0][1])


# -- caption augmentation --------------------------------------------------------------------------------------

TEXT = {"lock_text": True, "text_augment_variants": 2, "text_augment_strength": 0.3}


def test_cached_caption_variants_train_like_on_the_fly_ones_and_resume_exactly(
    scenes: Path, tmp_path: Path
) -> None:
    cached = train(_config(scenes, tmp_path / "cached", **TEXT))
    assert len(list((tmp_path / "cached" / "feature-cache").glob("text-*"))) == 3  # originals + 2 variants
    fly = train(_config(scenes, tmp_path / "fly", feature_cache=False, **TEXT))
    losses = [r["loss"] for r in _steps(cached.run_dir)]
    assert losses == pytest.approx([r["loss"] for r in _steps(fly.run_dir)], rel=1e-5, abs=1e-6)
    a, b = load_checkpoint(cached.run_dir)["model"], load_checkpoint(fly.run_dir)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # resumed in the second epoch: the same variants, so the same weights
    train(_config(scenes, tmp_path / "resumed", max_steps=8, **TEXT))
    resumed = train(_config(scenes, tmp_path / "resumed", **TEXT), resume=tmp_path / "resumed")
    _assert_equal(load(cached.last_model).state_dict(), load(resumed.last_model).state_dict())
    assert [r["loss"] for r in _steps(resumed.run_dir)] == losses
    # and the step saw them: without variants the losses differ
    plain = train(_config(scenes, tmp_path / "plain", lock_text=True, max_steps=2))
    assert losses[:2] != pytest.approx([r["loss"] for r in _steps(plain.run_dir)], abs=1e-4)


def test_variant_cache_rows_are_the_features_of_the_augmented_captions(tmp_path: Path) -> None:
    from clipcraft.data.text_augment import caption_variant
    from clipcraft.precision import Precision
    from clipcraft.train.features import build_or_load_cache
    from clipcraft.train.text_variants import CaptionVariantCache, variant_dataset

    torch.manual_seed(0)
    model = create_model("tiny", overrides={"text.lock": True}).eval()
    records = [
        CaptionRecord(
            "a.png", ("a red circle on the left of a blue square", "two green shapes side by side")
        ),
        CaptionRecord("b.png", ("a small yellow triangle", "one big purple star above", "a dark scene")),
        CaptionRecord("c.png", ("an orange square next to a grey circle and a white ring",)),
    ]
    dataset = CaptionDataset(records, source="mem")
    caches = []
    for variant in range(3):
        version = variant_dataset(dataset, variant, 0.5, seed=4) if variant else dataset
        cache, _, _ = build_or_load_cache(
            model,
            version,
            "text",
            tmp_path,
            batch_size=4,
            num_workers=0,
            precision=Precision.FP32,
            progress=False,
        )
        caches.append(cache)
    variants = CaptionVariantCache(caches, seed=4)
    variants.set_epoch(1)
    images = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0] * 3)
    first = torch.tensor([1, 2, 0, 0, 0, 0, 1, 1] * 3)
    rows = variants.caption_rows(images, first, k=2)  # (48, F)
    choice = variants.choices(images, first, k=2)
    assert set(choice.tolist()) == {0, 1, 2}
    texts = []
    for i, (image, start) in enumerate(zip(images.tolist(), first.tolist(), strict=True)):
        captions = records[image].captions
        for s in range(2):
            original = captions[(start + s) % len(captions)]
            texts.append(caption_variant(original, int(choice[i * 2 + s]), 0.5, seed=4))
    with torch.no_grad():
        tokens = model.tokenize(texts)
        direct = model.text_tower(tokens["input_ids"], tokens["attention_mask"])  # (48, F)
    torch.testing.assert_close(rows, direct, rtol=1e-5, atol=1e-5)
    assert any(t not in {c for r in records for c in r.captions} for t in texts)  # variants were read
    variants.set_epoch(2)
    assert not np.array_equal(variants.choices(images, first, k=2), choice)  # drawn again each epoch
