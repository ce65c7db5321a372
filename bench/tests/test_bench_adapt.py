"""bench_adapt's table: the retention share is each row's recall over the initial model's."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # bench/: the script and bench_finetune beside it
import bench_adapt  # noqa: E402


def _report() -> dict:
    machine = {"cpu": "CPU", "cpu_count": 2, "torch_threads": 2, "torch": "2", "cuda": None}
    settings = {"train_per_class": 10, "test_per_class": 5, "val_fraction": 0.1, "epochs": 1, "batch_size": 8,
                "lr_tower": 1e-4, "lr_text": 1e-5, "lr_head": 1e-3, "lr_lora": 1e-3, "layer_decay": 1.0,
                "alphas": "0,1", "note": "a stand-in"}  # fmt: skip
    lora = {"finetuned_top1": 0.5, "wise_top1": 0.4, "alpha": 0.5, "initial_retention": 0.2,
            "finetuned_retention": 0.1, "wise_retention": 0.18, "trainable_params": 40, "total_params": 1000,
            "seconds": 3.0, "peak_rss_mb": 2048, "best_epoch": 1}  # fmt: skip
    zeroshot = {"top1": 0.1, "retention": 0.2, "trainable_params": 0, "total_params": 1000, "seconds": 1.0,
                "peak_rss_mb": 1024}  # fmt: skip
    return {"model": "m", "command": "cmd", "machine": machine, "settings": settings,
            "subsets": {"train_images": 100, "test_images": 50, "retention_images": 1000},
            "results": {"zeroshot": zeroshot, "lora_both": lora}, "failed": {"flyp": "exit status 1"}}  # fmt: skip


def test_rows_show_top1_retention_share_and_trainable_fraction() -> None:
    text = bench_adapt.render(_report())
    assert "| zero-shot (the initial model) | 0.100 | 0.2000 | 100% | 0 (0.00%) | 1 s | 1.0 GB |" in text
    assert (
        "| FLYP + LoRA r=8 on both towers, alpha 1 (best val epoch 1) | 0.500 | 0.1000 | 50% | 40 (4.00%) | 3 s | 2.0 GB |"
        in text
    )
    assert "+ WiSE-FT (alpha 0.5: best val top-1) | 0.400 | 0.1800 | 90% |" in text
    assert (
        "| flyp | not run: exit status 1 |" in text
        and "(the standard protocol)" in text
        and "a stand-in" in text
    )
