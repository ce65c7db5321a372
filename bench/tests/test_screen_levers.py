"""screen_levers: every lever is a valid recipe config that differs from the baseline where it says, and the
table reads the runs' validation rows (never test figures)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import screen_levers  # noqa: E402

from clipcraft.train.config import TrainConfig, from_flat, gather_config  # noqa: E402


def _config(lever: str) -> TrainConfig:
    return from_flat(
        TrainConfig, gather_config(None, screen_levers.RECIPE, {}, screen_levers.LEVERS[lever][1])
    )


def test_every_lever_is_the_recipe_plus_its_own_change() -> None:
    base = _config("baseline")
    expected = {
        "label_smoothing": lambda c: c.label_smoothing == 0.1,
        "temperature_lr": lambda c: c.lr_logit_scale == 0.01,
        "temperature_fixed": lambda c: (
            not c.learn_logit_scale and c.model_overrides["init_logit_scale"] == 3.5066
        ),
        "ema": lambda c: c.ema_decay == 0.995,
        "slip": lambda c: c.ssl_weight == 1.0,
        "text_augment": lambda c: c.text_augment_variants == 2,
        "convnext_atto": lambda c: (
            c.model_overrides["image.name"] == "convnext_atto" and c.patch_dropout == 0
        ),
        "resnet18d": lambda c: c.model_overrides["image.preprocess.input_size"] == [3, 112, 112],
        "resnet10t": lambda c: c.model_overrides["image.name"] == "resnet10t" and c.channels_last,
        "mobilenetv4": lambda c: (
            c.model_overrides["image.name"] == "mobilenetv4_conv_small"
            and c.channels_last
            and c.patch_dropout == 0
        ),
        "mobilenetv3": lambda c: (
            c.model_overrides["image.name"] == "mobilenetv3_large_100" and c.channels_last
        ),
        "unlock_minilm": lambda c: c.text_unlocked_groups == 1 and c.captions_per_image == 1,
        "bf16": lambda c: c.run.precision == "bf16",
    }
    assert set(expected) | {"baseline"} == set(screen_levers.LEVERS)
    for lever, check in expected.items():
        config = _config(lever)
        assert check(config), lever
        assert config != base, lever
        assert config.optim.epochs == base.optim.epochs and config.data == base.data, (
            lever
        )  # nothing else moved


def test_train_command_shortens_the_schedule_and_shares_the_cache(tmp_path: Path) -> None:
    cmd = screen_levers.train_command("ema", 7, 3, tmp_path / "run", tmp_path / "cache")
    assert cmd[-1] == "ema_decay=0.995"
    assert {"epochs=7", "seed=3", f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"} <= set(
        cmd
    )


def _command_config(cmd: list[str]) -> TrainConfig:
    overrides = cmd[cmd.index("--config") + 2 :]
    return from_flat(TrainConfig, gather_config(None, screen_levers.RECIPE, {}, overrides))


def test_every_lever_but_bf16_trains_in_fp32_whatever_the_machine(tmp_path: Path) -> None:
    # The recipe's precision=auto differs between CPUs; the screen's runs must not.
    assert _config("baseline").run.precision == "auto"
    for lever in screen_levers.LEVERS:
        config = _command_config(screen_levers.train_command(lever, 6, 0, tmp_path / lever, None))
        assert config.run.precision == ("bf16" if lever == "bf16" else "fp32"), lever


def test_a_screen_refuses_rows_from_another_kind_of_cpu(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "screen.json"
    avx2 = {"model": "AMD EPYC", "bf16_flags": [], "native_bf16": False, "avx2": True}
    bf16 = {**avx2, "bf16_flags": ["avx512_bf16"], "native_bf16": True}
    settings = {"epochs": 6, "seed": 0, "cifar_per_class": 200}
    out.write_text(json.dumps({"results": {}, "failed": {}, "settings": settings,
                               "machine": {**avx2, "cores": 2}}))  # fmt: skip
    monkeypatch.setattr(screen_levers, "cpu_info", lambda: bf16)
    monkeypatch.setattr(screen_levers.os, "cpu_count", lambda: 2)
    argv = ["--epochs", "6", "--levers", "baseline", "--out", str(out), "--section", str(tmp_path / "s.md")]
    with pytest.raises(SystemExit):
        screen_levers.main(argv)
    assert "another kind of CPU" in capsys.readouterr().err
    assert screen_levers.same_machine({**avx2, "cores": 2}, {**avx2, "cores": 2})
    assert not screen_levers.same_machine({**avx2, "cores": 2}, {**avx2, "cores": 4})


def _metrics(run: Path, recalls: list[float]) -> None:
    rows = [{"type": "step", "step": i, "samples_per_s": s, "logit_scale": 14.0 + i} for i, s in
            enumerate([1.0, 100.0, 120.0, 110.0])]  # fmt: skip
    rows += [{"type": "epoch", "epoch": i + 1, "recall_mean": r} for i, r in enumerate(recalls)]
    rows.append({"type": "test", "recall_mean": 0.9})  # never read
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_read_run_takes_validation_epochs_and_skips_the_warm_up_step(tmp_path: Path) -> None:
    _metrics(tmp_path / "r", [0.01, 0.05, 0.04])
    got = screen_levers.read_run(tmp_path / "r")
    assert got["val_recall_mean_best"] == 0.05 and got["val_recall_mean_last"] == 0.04
    assert got["samples_per_s_median"] == 110.0 and got["logit_scale_last"] == 17.0


def test_table_shows_each_levers_change_from_the_baseline() -> None:
    row = {"what": "x", "seconds": 600.0, "samples_per_s_median": 120.0, "logit_scale_last": 15.0,
           "val_recall_mean_best": 0.070, "val_recall_mean_last": 0.069, "cifar10_train_zeroshot": 0.25}  # fmt: skip
    report = {
        "command": "cmd",
        "machine": {"model": "CPU", "cores": 2, "native_bf16": False},
        "settings": {"epochs": 10, "seed": 0, "cifar_per_class": 200},
        "results": {
            "baseline": row,
            "ema": {**row, "val_recall_mean_best": 0.076, "cifar10_train_zeroshot": 0.24},
        },
        "failed": {"slip": "exit status 1"},
    }
    text = screen_levers.render(report)
    assert "| ema: x | 0.0760 / 0.0690 | +0.0060 | 0.240 | -0.010 | 120.0 | 60 | 60 | 15.0 |" in text
    assert "| slip: SLIP" in text and "failed: exit status 1" in text


def test_test_figures_read_the_trainers_test_pass_all_cifar_test_images_and_the_probe(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import clipcraft
    import clipcraft.evaluation.runners as runners

    run = tmp_path / "run"
    run.mkdir()
    summary = {f"test_{k}": 0.1 + i / 100 for i, k in enumerate(screen_levers.RECALL_KEYS)}
    (run / "summary.json").write_text(
        json.dumps({**summary, "best_model": str(run / "best"), "last_model": "x"})
    )
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(clipcraft, "load", lambda path: f"model:{path}")
    monkeypatch.setattr(
        runners, "evaluate_zeroshot", lambda m, data, **kw: calls.append((m, data, kw)) or {"top1": 0.31234}
    )
    monkeypatch.setattr(
        screen_levers,
        "probe_cifar",
        lambda m, cifar, n_train, n_test, **kw: (
            calls.append((m, cifar, n_train, n_test, kw)) or {"top1": 0.51234, "l2": 0.001}
        ),
    )
    cifar = tmp_path / "cifar10"
    got = screen_levers.test_figures(run, cifar, probe_train_per_class=1000)
    assert got["recall_mean"] == 0.1 and got["t2i_r10"] == 0.16
    assert got["cifar10_test_zeroshot"] == 0.3123 and got["cifar10_linear_probe"] == 0.5123
    cache = {"cache_dir": run / "eval-cache"}  # one cache: the test images are encoded once
    assert calls == [
        (f"model:{run / 'best'}", str(cifar / "test"), cache),  # no per-class limit: every test image
        (f"model:{run / 'best'}", cifar, 1000, None, cache),
    ]
    # Figures already measured are kept: only the missing probe runs.
    calls.clear()
    again = screen_levers.test_figures(run, cifar, {"cifar10_test_zeroshot": 0.2}, probe_train_per_class=10)
    assert again["cifar10_test_zeroshot"] == 0.2 and [c[2] for c in calls] == [10]
    calls.clear()
    assert screen_levers.test_figures(run, cifar, got) == got and calls == []
    (run / "summary.json").write_text(json.dumps({"best_model": None, "last_model": "x"}))
    with pytest.raises(RuntimeError, match="no test pass"):
        screen_levers.test_figures(run, tmp_path)


def test_test_table_is_a_second_table_after_the_validation_one() -> None:
    base = {k: 0.05 for k in screen_levers.RECALL_KEYS} | {
        "cifar10_test_zeroshot": 0.2,
        "cifar10_linear_probe": 0.5,
    }
    lines = screen_levers.render_test(
        {"baseline": base, "slip": {**base, "recall_mean": 0.06, "cifar10_linear_probe": 0.52}}, 6, 1000
    )
    assert (
        "| slip | 0.0600 | +0.0100 | 0.050 / 0.050 / 0.050 | 0.050 / 0.050 / 0.050 | 0.200 | +0.000 "
        "| 0.520 | +0.020 |" in lines
    )
    assert lines[0].startswith("The same 6-epoch runs on the test splits")
    assert "first 1000 train images per class" in lines[0]
    # A run whose probe was not measured says so rather than showing a number.
    partial = {"baseline": base, "ema": {k: v for k, v in base.items() if k != "cifar10_linear_probe"}}
    assert screen_levers.render_test(partial, 6)[-2].endswith("| not run | not run |")
