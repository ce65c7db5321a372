"""Precision decided once: the user's word resolved at the edge with the hardware probe patched both ways
(never the host's own features), and lower layers refusing ``auto``."""

from __future__ import annotations

import pytest

from clipcraft import precision as precision_module
from clipcraft.errors import ClipcraftError
from clipcraft.precision import Precision, as_precision, autocast, resolve_precision


@pytest.mark.parametrize("native", [False, True])
def test_auto_follows_the_cpu_probe_and_explicit_words_pass_through(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") is (Precision.BF16 if native else Precision.FP32)
    assert resolve_precision("fp32", "cpu") is Precision.FP32
    assert resolve_precision("bf16", "cpu") is Precision.BF16  # honoured (emulated) on any CPU
    assert resolve_precision(Precision.FP32, "cpu") is Precision.FP32


@pytest.mark.parametrize("cuda_bf16", [False, True])
def test_auto_on_cuda_asks_torch(monkeypatch, cuda_bf16: bool) -> None:
    monkeypatch.setattr(precision_module, "cuda_has_bf16", lambda device=None: cuda_bf16)
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: not cuda_bf16)  # must not matter
    assert resolve_precision("auto", "cuda:0") is (Precision.BF16 if cuda_bf16 else Precision.FP32)


def test_unknown_words_and_auto_below_the_edge_are_refused() -> None:
    with pytest.raises(ClipcraftError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ClipcraftError, match="resolve it first"):
        as_precision("auto")
    with pytest.raises(ClipcraftError, match="fp32 or bf16"):
        as_precision("half")
    with pytest.raises(ClipcraftError, match="resolve it first"):
        autocast("cpu", "auto")
    assert as_precision("bf16") is Precision.BF16
    assert Precision.BF16 == "bf16" and str(Precision.FP32) == "fp32"


def test_autocast_is_bf16_only_when_asked() -> None:
    import torch

    with autocast("cpu", Precision.BF16):
        assert torch.is_autocast_enabled("cpu")
    with autocast("cpu", Precision.FP32):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(
    ("caps", "native"),
    [
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, False),  # e.g. the AVX2-only EPYC
        ({"avx2": True, "avx512_bf16": True}, True),
        ({"avx2": True, "amx_bf16": True, "amx_tile": True}, True),
        ({"architecture": "arm64", "bf16": True}, True),
    ],
)
def test_the_probe_reads_torchs_public_cpu_capabilities(monkeypatch, caps: dict, native: bool) -> None:
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert precision_module.cpu_has_native_bf16.__wrapped__() is native
