"""Parity of the bf16-via-float32 fast path (towers.Bf16ViaFp32) with plain bf16 autocast.

Both compute bf16-rounded operands with float32 accumulation, so they agree to bf16 rounding (a relative
1e-2 is a few bf16 ulps); a wrong transpose, scale or missing bias would be off by O(1).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clipcraft import create_model, towers
from clipcraft.losses import clip_loss
from clipcraft.towers import Bf16ViaFp32

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _close(fast: torch.Tensor, simple: torch.Tensor, rtol: float = 2e-2) -> None:
    assert fast.dtype == simple.dtype and fast.shape == simple.shape
    err = (fast.float() - simple.float()).norm() / simple.float().norm().clamp(min=1e-12)
    assert err < rtol, f"relative error {err:.3g}"


def _run(fn, inputs: list[torch.Tensor], fast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    mode = Bf16ViaFp32() if fast else torch.autocast(**BF16, enabled=True)
    with torch.autocast(**BF16), mode:
        out = fn(*leaves)
    torch.manual_seed(1)
    out.backward(torch.randn(out.shape, dtype=out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_autocast_bf16(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 40, bias=bias)
    params = [layer.weight] + ([layer.bias] if bias else [])
    x = torch.randn(3, 7, 48)
    fn = lambda x, w, *b: F.linear(x, w, b[0] if b else None)  # noqa: E731
    out_fast, grads_fast = _run(fn, [x, *params], fast=True)
    out_simple, grads_simple = _run(fn, [x, *params], fast=False)
    assert out_fast.dtype == torch.bfloat16
    _close(out_fast, out_simple)
    for g_fast, g_simple in zip(grads_fast, grads_simple, strict=True):
        _close(g_fast, g_simple)


def test_attention_matches_autocast_bf16() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 16).bfloat16() for _ in range(3))
    for scale in (None, 0.3):
        fn = functools.partial(F.scaled_dot_product_attention, scale=scale)
        out_fast, grads_fast = _run(fn, [q, k, v], fast=True)
        out_simple, grads_simple = _run(fn, [q, k, v], fast=False)
        _close(out_fast, out_simple)
        for g_fast, g_simple in zip(grads_fast, grads_simple, strict=True):
            _close(g_fast, g_simple)


def test_conv2d_matches_autocast_bf16() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 16, 16)
    fn = lambda x, w, b: F.conv2d(x, w, b, stride=4)  # noqa: E731
    out_fast, grads_fast = _run(fn, [x, conv.weight, conv.bias], fast=True)
    out_simple, grads_simple = _run(fn, [x, conv.weight, conv.bias], fast=False)
    _close(out_fast, out_simple)
    for g_fast, g_simple in zip(grads_fast, grads_simple, strict=True):
        _close(g_fast, g_simple)


def test_masked_attention_and_float32_passes_through_unchanged() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8).bfloat16() for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    with torch.autocast(**BF16):
        plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with Bf16ViaFp32():
            routed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(plain, routed)
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    with Bf16ViaFp32():  # no autocast: float32 stays float32, bit for bit
        assert torch.equal(F.linear(x, w), x @ w.T)


def _tiny_step(fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    monkeypatch.setattr(towers, "cpu_has_native_bf16", lambda: not fast)
    torch.manual_seed(0)
    model = create_model("tiny").train()
    images = torch.randn(4, 3, 32, 32)
    texts = model.tokenize(["a dog", "two cats on a mat", "red", "a long caption about nothing much"])
    with torch.autocast(**BF16):
        out = model(images, texts)
        loss = clip_loss(out.image_embeddings, out.text_embeddings, out.logit_scale)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_towers_use_the_fast_path_and_match_plain_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = towers._LinearViaFp32.apply
    monkeypatch.setattr(towers._LinearViaFp32, "apply", lambda *a: calls.append(1) or original(*a))
    loss_fast, grads_fast = _tiny_step(True, monkeypatch)
    assert calls, "the towers did not route their linear layers through the fast path"
    calls.clear()
    loss_simple, grads_simple = _tiny_step(False, monkeypatch)
    assert not calls
    assert abs(loss_fast.item() - loss_simple.item()) < 2e-2 * abs(loss_simple.item())
    assert grads_fast.keys() == grads_simple.keys()
    trunk = [
        n for n in grads_simple if n.startswith(("image_tower.trunk.blocks", "text_tower.model.encoder"))
    ]
    assert trunk
    for name in trunk:
        _close(grads_fast[name], grads_simple[name], rtol=5e-2)
