"""bench_memory_format: both layouts are timed for every model and written with the machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
