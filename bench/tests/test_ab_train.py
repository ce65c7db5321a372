"""ab_train: the runs alternate, only steps after the first epoch are timed, and the summary is their median."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ab_train  # noqa: E402


def _metrics(run: Path, rates_by_epoch: list[list[float]]) -> None:
    rows = [
        {"type": "step", "epoch": e, "samples_per_s": s}
        for e, rates in enumerate(rates_by_epoch)
        for s in rates
    ]
    rows += [{"type": "epoch", "epoch": e + 1, "recall_mean": 0.1} for e in range(len(rates_by_epoch))]
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_runs_alternate_so_drift_hits_both_settings_alike() -> None:
    assert ab_train.order(3) == ["a", "b", "b", "a", "a", "b"]


def test_the_first_epoch_is_not_timed(tmp_path: Path) -> None:
    _metrics(tmp_path / "r", [[10.0, 20.0], [100.0, 120.0], [110.0]])
    assert ab_train.steady_rates(tmp_path / "r") == [100.0, 120.0, 110.0]
    _metrics(tmp_path / "one", [[10.0]])
    with pytest.raises(RuntimeError, match="after the first epoch"):
        ab_train.steady_rates(tmp_path / "one")


def test_the_setting_comes_after_the_shared_overrides(tmp_path: Path) -> None:
    cmd = ab_train.train_command(ab_train.RECIPE, ["precision=bf16"], 3, tmp_path / "r", tmp_path / "c")
    assert cmd[-1] == "precision=bf16"
    assert {"epochs=3", f"output_dir={tmp_path / 'r'}", f"cache_dir={tmp_path / 'c'}"} <= set(cmd)


def test_main_runs_each_setting_and_reports_medians_and_their_ratio(tmp_path: Path, monkeypatch) -> None:
    speed = {"precision=fp32": 100.0, "precision=bf16": 150.0}
    seen = []

    def fake_run(cmd, **kwargs):  # noqa: ANN001, ANN003
        run_dir = Path(next(a for a in cmd if a.startswith("output_dir=")).split("=", 1)[1])
        seen.append(cmd[-1])
        _metrics(run_dir, [[1.0], [speed[cmd[-1]], speed[cmd[-1]] + 2]])

    monkeypatch.setattr(ab_train, "cpu_info", lambda: {"model": "test CPU", "native_bf16": False})
    monkeypatch.setattr(ab_train.subprocess, "run", fake_run)
    out = tmp_path / "ab.json"
    argv = ["--a", "precision=fp32", "--b", "precision=bf16", "--rounds", "2", "--epochs", "2"]
    assert ab_train.main([*argv, "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert seen == ["precision=fp32", "precision=bf16", "precision=bf16", "precision=fp32"]
    summary = json.loads(out.read_text())["summary"]
    assert summary["a"]["samples_per_s_median"] == 101.0 and summary["b"]["samples_per_s_median"] == 151.0
    assert summary["a"]["runs"] == summary["b"]["runs"] == 2
    assert summary["b_over_a"]["samples_per_s"] == pytest.approx(151 / 101, abs=1e-3)
