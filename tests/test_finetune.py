"""Fine-tuning from the zero-shot head: step 0 = zero-shot, training, WiSE-FT, resume, save/load, classify, errors.

Everything runs on the tiny preset and solid-colour class folders written in tmp dirs (a few seconds each).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcraft.cli import build_parser, main
from clipcraft.errors import CheckpointError, ClipcraftError
from clipcraft.evaluation.runners import evaluate_zeroshot
from clipcraft.evaluation.zeroshot import ZeroShotClassifier
from clipcraft.finetune import (
    FinetuneConfig,
    ImageClassifier,
    evaluate_classifier,
    finetune,
    interpolate_weights,
    load_classifier,
    read_classification_data,
)
from clipcraft.finetune.config import check_alphas
from clipcraft.finetune.loop import BEST_WEIGHTS
from clipcraft.finetune.wise import best_alpha, sweep_alphas
from clipcraft.model import create_model, load
from conftest import COLOURS, write_colour_split


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    for split, count, seed in (("train", 8, 0), ("val", 4, 1), ("test", 4, 2)):
        write_colour_split(root / split, count, seed)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny preset with dropout in its heads, so a resumed run must restore the RNG to match."""
    torch.manual_seed(0)
    model = create_model("tiny", overrides={"head.dropout": 0.1})
    return model.save(tmp_path_factory.mktemp("model") / "tiny")


def _config(model_dir: Path, colours: Path, out: Path, **changes) -> FinetuneConfig:
    fields = dict(
        model=str(model_dir),
        train=str(colours / "train"),
        val=str(colours / "val"),
        test=str(colours / "test"),
        output_dir=str(out),
        epochs=4,
        batch_size=6,
        lr_tower=1e-3,
        lr_head=1e-2,
        warmup_steps=2,
        patience=0,
        alphas=(0.0, 0.25, 0.5, 0.75, 1.0),
        device="cpu",
        precision="fp32",
        log_every=1,
    )
    fields.update(changes)
    return FinetuneConfig.from_dict(fields)


@pytest.fixture(scope="module")
def trained(model_dir, colours, tmp_path_factory):
    """One finished run, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "ft"
    return finetune(_config(model_dir, colours, out))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# -- step 0 is zero-shot -----------------------------------------------------------------------------------


def test_zeroshot_head_predicts_exactly_what_zeroshot_clip_predicts(model_dir, colours) -> None:
    model = load(model_dir)
    names = ["red", "green", "blue"]
    images = sorted(str(p) for p in (colours / "test").rglob("*.png"))
    classifier = ImageClassifier.from_zeroshot(model, names)
    zeroshot = ZeroShotClassifier(model, names)
    labels, probs = classifier.predict(images)
    zs_labels, zs_probs = zeroshot.predict(images)
    assert labels == zs_labels
    np.testing.assert_allclose(probs, zs_probs, rtol=1e-5, atol=1e-6)
    emb = model.encode_images(images)
    np.testing.assert_allclose(classifier.logits(emb), zeroshot.logits(emb), rtol=1e-5, atol=1e-5)


def test_step_zero_validation_is_the_zeroshot_accuracy(trained, model_dir, colours) -> None:
    step0 = _metrics(trained.output_dir)[0]
    assert (step0["type"], step0["step"]) == ("val", 0)
    runner = evaluate_zeroshot(load(model_dir), colours / "val")
    assert step0["val_top1"] == pytest.approx(runner["top1"], abs=1e-12)
    assert trained.summary["val"]["zeroshot"]["top1"] == pytest.approx(runner["top1"], abs=1e-12)


# -- training ------------------------------------------------------------------------------------------------


def test_training_beats_zeroshot_on_separable_colours(trained) -> None:
    s = trained.summary
    assert trained.finished and trained.steps == 4 * 4
    assert s["val"]["zeroshot"]["top1"] < 0.7  # a random tiny model knows no colours
    assert s["val"]["finetuned"]["top1"] == 1.0 and s["test"]["finetuned"]["top1"] >= 0.9
    assert s["best_epoch"] >= 1
    rows = _metrics(trained.output_dir)
    steps = [r for r in rows if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert steps[-1]["loss"] < steps[0]["loss"]
    # the tower trains at the lower rate: peak rates are the configured ones
    assert max(r["lr_image_tower"] for r in steps) == pytest.approx(1e-3)
    assert max(r["lr_classifier"] for r in steps) == pytest.approx(1e-2)
    assert {r["alpha"] for r in rows if r["type"] == "wise"} == {0.0, 0.25, 0.5, 0.75, 1.0}


def test_early_stopping_keeps_the_zeroshot_head_when_nothing_improves(model_dir, colours, tmp_path) -> None:
    config = _config(model_dir, colours, tmp_path / "ft", lr_tower=0.0, lr_head=0.0, epochs=5, patience=1)
    result = finetune(config)
    s = result.summary
    assert result.finished and s["stopped_early"] and result.epochs == 1
    assert s["best_epoch"] == 0 and not (tmp_path / "ft" / BEST_WEIGHTS).exists()
    assert s["alpha"] == 0.0  # every mix is the zero-shot model: the tie goes to the smallest alpha
    assert s["test"]["wise"]["top1"] == s["test"]["zeroshot"]["top1"]


# -- weight-space ensembling -----------------------------------------------------------------------------------


def test_interpolation_ends_are_exact_and_the_middle_is_the_mean() -> None:
    g = torch.Generator().manual_seed(0)
    zs = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor([7])}
    ft = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor([7])}
    for key in ("w", "b"):
        assert torch.equal(interpolate_weights(zs, ft, 0.0)[key], zs[key])
        assert torch.equal(interpolate_weights(zs, ft, 1.0)[key], ft[key])
        torch.testing.assert_close(interpolate_weights(zs, ft, 0.5)[key], (zs[key] + ft[key]) / 2)
    assert torch.equal(interpolate_weights(zs, ft, 0.3)["n"], zs["n"])
    with pytest.raises(CheckpointError, match="non-float"):
        interpolate_weights(zs, {**ft, "n": torch.tensor([8])}, 0.5)
    with pytest.raises(CheckpointError, match="different keys"):
        interpolate_weights(zs, {"w": ft["w"]}, 0.5)
    with pytest.raises(ClipcraftError, match="outside"):
        interpolate_weights(zs, ft, 1.5)


def test_wise_alpha_0_and_1_reproduce_the_real_zeroshot_and_finetuned_weights(trained, model_dir) -> None:
    fresh = ImageClassifier.from_zeroshot(load(model_dir), trained.summary["data"]["classnames"])
    zeroshot = {k: v.clone() for k, v in fresh.trainable_state().items()}
    finetuned = torch.load(trained.output_dir / BEST_WEIGHTS, weights_only=True)
    assert any(not torch.equal(zeroshot[k], finetuned[k]) for k in zeroshot)
    for alpha, want in ((0.0, zeroshot), (1.0, finetuned)):
        mixed = interpolate_weights(zeroshot, finetuned, alpha)
        assert all(torch.equal(mixed[k], want[k]) for k in want), alpha


def test_reused_alpha_0_and_1_metrics_equal_evaluating_the_mixtures(trained, model_dir, colours) -> None:
    # The sweep reuses the step-0 and best-epoch validations for alpha 0 and 1: parity with evaluating them.
    classifier = load_classifier(trained.output_dir)
    fresh = ImageClassifier.from_zeroshot(load(model_dir), classifier.classnames)
    zeroshot = {k: v.clone() for k, v in fresh.trainable_state().items()}
    finetuned = torch.load(trained.output_dir / BEST_WEIGHTS, weights_only=True)
    val = read_classification_data(colours / "train", colours / "val").val

    def evaluate() -> dict:
        return evaluate_classifier(classifier, val, precision="fp32")

    computed = sweep_alphas(zeroshot, finetuned, [0.0, 1.0], classifier.load_trainable_state, evaluate)
    recorded = {r["alpha"]: r for r in trained.summary["wise"]}
    for row in computed:
        assert row == pytest.approx(recorded[row["alpha"]], abs=1e-9)


def test_best_alpha_prefers_accuracy_then_loss_then_smaller_alpha() -> None:
    rows = [
        {"alpha": 0.0, "top1": 0.5, "loss": 0.1},
        {"alpha": 0.5, "top1": 0.9, "loss": 0.4},
        {"alpha": 0.7, "top1": 0.9, "loss": 0.3},
        {"alpha": 1.0, "top1": 0.9, "loss": 0.3},
    ]
    assert best_alpha(rows) == 0.7


def test_saved_model_is_the_best_alpha_mixture(trained) -> None:
    info = json.loads((trained.output_dir / "classifier.json").read_text())["info"]
    assert info["alpha"] == trained.summary["alpha"]
    chosen = max(trained.summary["wise"], key=lambda r: r["top1"])["top1"]
    assert trained.summary["val"]["wise"]["top1"] == chosen


# -- resume -------------------------------------------------------------------------------------------------


def _same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "classifier.safetensors"):
        x, y = _state_of(a / name), _state_of(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    last_a = torch.load(a / "checkpoint.pt", weights_only=False)["model"]
    last_b = torch.load(b / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    losses = [[r["loss"] for r in _metrics(d) if r["type"] == "step"] for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 8  # the resumed log has no gaps or repeats


def test_stopped_and_resumed_run_matches_the_uninterrupted_one(
    model_dir, colours, tmp_path, monkeypatch
) -> None:
    straight = finetune(_config(model_dir, colours, tmp_path / "a", epochs=2))

    # stopped at max_steps in the middle of the first epoch, then resumed without the limit
    stopped = finetune(_config(model_dir, colours, tmp_path / "b", epochs=2, max_steps=3))
    assert not stopped.finished and stopped.steps == 3 and not (tmp_path / "b" / "classifier.json").exists()
    resumed = finetune(_config(model_dir, colours, tmp_path / "b", epochs=2), resume=tmp_path / "b")
    assert resumed.finished and resumed.steps == straight.steps == 8
    assert resumed.summary["wise"] == straight.summary["wise"]
    _same_weights(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ClipcraftError, match="finished"):
        finetune(_config(model_dir, colours, tmp_path / "b"), resume=tmp_path / "b")

    # killed while loading batch 7 (after step 6 and its checkpoint), then resumed from that checkpoint
    from clipcraft.finetune.data import TrainImages

    original, calls = TrainImages.__getitem__, []

    def dies_at_batch_7(self, key):
        calls.append(key)
        if len(calls) == 6 * 6 + 1:
            raise RuntimeError("killed")
        return original(self, key)

    monkeypatch.setattr(TrainImages, "__getitem__", dies_at_batch_7)
    config = _config(model_dir, colours, tmp_path / "c", epochs=2, checkpoint_every=3)
    with pytest.raises(RuntimeError, match="killed"):
        finetune(config)
    monkeypatch.setattr(TrainImages, "__getitem__", original)
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)["state"]["step"] == 6
    assert finetune(config, resume=tmp_path / "c").finished
    _same_weights(tmp_path / "a", tmp_path / "c")


# -- save, load, classify ---------------------------------------------------------------------------------------


def test_saved_classifier_loads_as_a_model_and_as_a_classifier(trained, colours) -> None:
    out = trained.output_dir
    model = load(out)  # still an ordinary clipcraft model directory
    assert model.embed_dim == 16
    classifier = load_classifier(out)
    assert classifier.classnames == ["blue", "green", "red"] and classifier.keys == classifier.classnames
    test = read_classification_data(colours / "train", colours / "val", colours / "test").test
    labels, probs = classifier.predict(test.paths)
    truth = [test.classnames[i] for i in test.labels]
    accuracy = np.mean([a == b for a, b in zip(labels, truth, strict=True)])
    assert accuracy == pytest.approx(trained.summary["test"]["wise"]["top1"])
    assert probs.shape == (len(test), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_classify_cli_uses_the_finetuned_head(trained, colours, model_dir, capsys) -> None:
    images = [str(colours / "test" / c / "0.png") for c in ("red", "green", "blue")]
    assert main(["classify", "--model", str(trained.output_dir), *images, "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected, _ = load_classifier(trained.output_dir).predict(images)
    assert [row["label"] for row in printed] == expected
    assert [row["image"] for row in printed] == images

    # --labels still means zero-shot, on any model
    assert main(["classify", "--model", str(trained.output_dir), "--labels", "cat,dog", images[0]]) == 0
    assert capsys.readouterr().out.split("\t")[1].split()[0] in ("cat", "dog")
    assert main(["classify", "--model", str(model_dir), images[0]]) == 2
    assert "not a fine-tuned classifier" in capsys.readouterr().err


def test_finetune_cli_end_to_end(model_dir, colours, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    argv = [
        "finetune",
        "--model",
        str(model_dir),
        "--train",
        str(colours / "train"),
        "--output-dir",
        str(out),
    ]
    argv += ["--epochs", "1", "--alphas", "0,1", "--val-fraction", "0.25", "device=cpu", "lr_head=0.01"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "<- saved" in printed and "Saved the fine-tuned classifier" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["num_val"] == 6 and summary["data"]["num_train"] == 18  # 2 of 8 per class carved
    assert summary["test"] == {} and [r["alpha"] for r in summary["wise"]] == [0.0, 1.0]


def test_auto_precision_is_recorded_as_the_precision_that_ran(
    model_dir, colours, tmp_path, monkeypatch
) -> None:
    """With native bf16 (patched: never the host's), auto runs in bf16, and the run records bf16 (and that
    auto was asked for) in config.yaml, the checkpoint and summary.json."""
    import yaml

    monkeypatch.setattr("clipcraft.precision.cpu_has_native_bf16", lambda: True)
    out = tmp_path / "bf16"
    config = _config(model_dir, colours, out, epochs=1, precision="auto", alphas=(0.0, 1.0))
    assert config.run.precision == "auto"
    result = finetune(config)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["precision"] == "bf16" and "auto requested" in (out / "config.yaml").read_text()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["config"]["precision"] == checkpoint["precision"] == "bf16"
    assert checkpoint["precision_requested"] == "auto"
    summary = json.loads((out / "summary.json").read_text())
    assert (
        (summary["precision"], summary["precision_requested"])
        == ("bf16", "auto")
        == (
            result.summary["precision"],
            result.summary["precision_requested"],
        )
    )
    assert summary["device"] == "cpu"


def test_config_shares_the_training_sections_with_its_own_defaults(tmp_path) -> None:
    from clipcraft.train.config import OptimConfig, RunConfig, TrainConfig

    config = FinetuneConfig.from_dict({"model": "m", "train": "t", "epochs": 3, "optim.eps": 1e-7})
    assert isinstance(config.optim, OptimConfig) and isinstance(config.run, RunConfig)
    assert (config.optim.epochs, config.optim.eps, config.optim.betas) == (3, 1e-7, (0.9, 0.999))
    assert config.optim.betas != TrainConfig().optim.betas  # fine-tuning's defaults, not training's
    assert config.run.output_dir == "runs/finetune" and config.loader.num_workers == 0
    assert FinetuneConfig.from_dict(config.to_dict()) == config  # the flat form round-trips
    with pytest.raises(ClipcraftError, match="Unknown config key.*lr_heads"):
        FinetuneConfig.from_dict({"lr_heads": 1e-3})


def test_help_has_an_example_and_registration_is_light(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["finetune", "--help"])
    assert exit_info.value.code == 0 and "Example" in capsys.readouterr().out
    code = (
        "import argparse, sys\n"
        "from clipcraft.finetune import commands\n"
        "commands.register(argparse.ArgumentParser().add_subparsers(), argparse.HelpFormatter)\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- bad input: a clear error before any work ------------------------------------------------------------------


def _fails_before_work(argv: list[str], out: Path, capsys, *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_one_class_only_is_an_error(model_dir, tmp_path, capsys) -> None:
    train = write_colour_split(tmp_path / "train", 4, 0, {"red": COLOURS["red"]})
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(model_dir), "--train", str(train), "--output-dir", str(out)]
    _fails_before_work(argv, out, capsys, "one class", "'red'", "at least two")


def test_class_folders_differing_between_train_and_test_is_an_error(
    model_dir, colours, tmp_path, capsys
) -> None:
    test = write_colour_split(tmp_path / "test", 2, 3, {"red": COLOURS["red"], "purple": (150, 0, 150)})
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(model_dir), "--train", str(colours / "train"), "--test", str(test)]
    _fails_before_work(
        [*argv, "--output-dir", str(out)], out, capsys, "differ", "only in train: ['blue', 'green']", "purple"
    )
    argv = ["finetune", "--model", str(model_dir), "--train", str(colours / "train"), "--val", str(test)]
    _fails_before_work([*argv, "--output-dir", str(out)], out, capsys, "differ", "only in val: ['purple']")


@pytest.mark.parametrize("alphas", ["0,1.5", "-0.1", "0,nan", "0,x"])
def test_alpha_outside_0_1_is_an_error(model_dir, colours, tmp_path, capsys, alphas) -> None:
    out = tmp_path / "out"
    argv = [
        "finetune",
        "--model",
        str(model_dir),
        "--train",
        str(colours / "train"),
        "--output-dir",
        str(out),
    ]
    _fails_before_work([*argv, "--alphas", alphas], out, capsys, "alpha")
    with pytest.raises(ClipcraftError):
        check_alphas([])


def test_empty_class_folder_is_an_error(model_dir, colours, tmp_path, capsys) -> None:
    train = write_colour_split(tmp_path / "train", 3, 0)
    (train / "yellow").mkdir()
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(model_dir), "--train", str(train), "--output-dir", str(out)]
    _fails_before_work(argv, out, capsys, "hold no image files", "yellow")


def test_other_bad_setups_are_errors(model_dir, colours, trained, tmp_path, capsys) -> None:
    base = ["finetune", "--model", str(model_dir), "--train", str(colours / "train")]
    out = tmp_path / "out"
    _fails_before_work(
        [*base, "--output-dir", str(out), "--model", str(tmp_path / "none")], out, capsys, "not found"
    )
    _fails_before_work([*base], out, capsys, "--output-dir OUT_DIR")
    _fails_before_work([*base, "--output-dir", str(model_dir)], out, capsys, "is the model being fine-tuned")
    before = (trained.output_dir / "metrics.jsonl").read_text()
    assert main([*base, "--output-dir", str(trained.output_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (trained.output_dir / "metrics.jsonl").read_text() == before  # the earlier run is untouched
    tiny = write_colour_split(tmp_path / "tiny", 1, 0)  # one image a class: nothing to carve for validation
    _fails_before_work(
        ["finetune", "--model", str(model_dir), "--train", str(tiny), "--output-dir", str(out)],
        out,
        capsys,
        "no validation image",
    )
