"""bench_memory_format: both layouts are timed for every model and written with the machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_memory_format  # noqa: E402


def test_both_layouts_are_timed_and_recorded(tmp_path: Path) -> None:
    out = tmp_path / "mf.json"
    argv = ["--models", "resnet10t", "--size", "32", "--batch", "2", "--warmup", "0", "--steps", "2"]
    assert bench_memory_format.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["results"]["resnet10t"]
    assert row["nchw_samples_per_s"] > 0 and row["nhwc_samples_per_s"] > 0 and row["timed_steps_each"] == 2
    assert row["speedup"] > 0 and "native_bf16" in report["machine"]
    assert report["settings"] == {"size": 32, "batch": 2, "warmup": 0, "steps": 2}


def test_a_run_cut_short_keeps_the_models_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(models: list[str], *args: int) -> dict[str, dict[str, float]]:
        if models == ["second"]:
            raise KeyboardInterrupt  # a timeout or ^C during the second model
        return {m: {"nchw_samples_per_s": 1.0, "nhwc_samples_per_s": 2.0, "speedup": 2.0} for m in models}

    monkeypatch.setattr(bench_memory_format, "step_seconds", fake)
    out = tmp_path / "mf.json"
    with pytest.raises(KeyboardInterrupt):
        bench_memory_format.main(["--models", "first", "second", "--out", str(out)])
    assert list(json.loads(out.read_text())["results"]) == ["first"]
