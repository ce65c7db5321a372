"""Losses against plain loop references, and the gathered (distributed) mode against one process."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from clipcraft.losses import (
    ClipLoss,
    SimClrLoss,
    SlipLoss,
    build_loss,
    clip_loss,
    nt_xent_loss,
    siglip_loss,
)


def _embeddings(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img.float(), txt.float()


def reference_clip(img, txt, scale):
    """Cross-entropy written out element by element."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * (img[i] @ txt[j]) for j in range(n)]
        col = [scale * (txt[i] @ img[j]) for j in range(n)]
        total = total - (row[i] - torch.logsumexp(torch.stack(row), 0))
        total = total - (col[i] - torch.logsumexp(torch.stack(col), 0))
    return total / (2 * n)


def reference_siglip(img, txt, scale, bias):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * (img[i] @ txt[j]) + bias
            total = total - torch.log(torch.sigmoid(z * logit))
    return total / n


def _value_and_grads(fn, img, txt, *extra):
    img = img.clone().double().requires_grad_(True)
    txt = txt.clone().double().requires_grad_(True)
    loss = fn(img, txt, *extra)
    loss.backward()
    return loss.detach(), img.grad, txt.grad


def test_clip_loss_matches_loop_reference():
    img, txt = _embeddings(6, 8, seed=1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    ours = _value_and_grads(lambda a, b, s: clip_loss(a.double(), b.double(), s), img, txt, scale)
    ref = _value_and_grads(reference_clip, img, txt, scale)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def test_siglip_loss_matches_loop_reference():
    img, txt = _embeddings(5, 8, seed=2)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    ours = _value_and_grads(lambda a, b, s, c: siglip_loss(a, b, s, c), img, txt, scale, bias)
    ref = _value_and_grads(reference_siglip, img, txt, scale, bias)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def reference_clip_k(img, txt, scale, k):
    """Several captions per image, element by element: image i's loss is the mean over its k captions of
    -log softmax over all texts; each caption's loss is -log softmax over all images at its image."""
    n = img.shape[0]
    image_terms, text_terms = [], []
    for i in range(n):
        row = torch.stack([scale * (img[i] @ txt[t]) for t in range(n * k)])
        for j in range(k):
            image_terms.append(-(row[i * k + j] - torch.logsumexp(row, 0)))
    for t in range(n * k):
        col = torch.stack([scale * (txt[t] @ img[j]) for j in range(n)])
        text_terms.append(-(col[t // k] - torch.logsumexp(col, 0)))
    return (torch.stack(image_terms).mean() + torch.stack(text_terms).mean()) / 2


def reference_siglip_k(img, txt, scale, bias, k):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for t in range(n * k):
            z = 1.0 if t // k == i else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * (img[i] @ txt[t]) + bias)))
    return total / n


def test_several_captions_per_image_match_loop_references():
    k = 3
    img, _ = _embeddings(4, 8, seed=7)
    _, txt = _embeddings(4 * k, 8, seed=8)
    scale, bias = torch.tensor(9.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    ours = _value_and_grads(lambda a, b, s: clip_loss(a, b, s), img, txt, scale)
    ref = _value_and_grads(lambda a, b, s: reference_clip_k(a, b, s, k), img, txt, scale)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    ours = _value_and_grads(lambda a, b, s, c: siglip_loss(a, b, s, c), img, txt, scale, bias)
    ref = _value_and_grads(lambda a, b, s, c: reference_siglip_k(a, b, s, c, k), img, txt, scale, bias)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def _float64_pair(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n * k, 8, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def _assert_float64_close(ours, ref):
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
def test_float64_inputs_are_computed_in_float64(k):
    img, txt = _float64_pair(4, k, seed=11)
    scale, bias = torch.tensor(9.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    ours = _value_and_grads(lambda a, b, s: clip_loss(a, b, s), img, txt, scale)
    _assert_float64_close(
        ours, _value_and_grads(lambda a, b, s: reference_clip_k(a, b, s, k), img, txt, scale)
    )
    ours = _value_and_grads(lambda a, b, s, c: siglip_loss(a, b, s, c), img, txt, scale, bias)
    ref = _value_and_grads(lambda a, b, s, c: reference_siglip_k(a, b, s, c, k), img, txt, scale, bias)
    _assert_float64_close(ours, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    img, txt = _embeddings(4, 8, seed=12)
    loss = clip_loss(img.to(dtype), txt.to(dtype), 10.0)
    assert loss.dtype == torch.float32
    expected = clip_loss(img.to(dtype).float(), txt.to(dtype).float(), 10.0)
    torch.testing.assert_close(loss, expected)
    assert siglip_loss(img.to(dtype), txt.to(dtype), 10.0, -2.0).dtype == torch.float32


def test_one_caption_per_image_is_the_k1_case_and_bad_shapes_are_refused():
    img, txt = _embeddings(5, 8, seed=9)
    torch.testing.assert_close(clip_loss(img, txt, 7.0), reference_clip(img, txt, 7.0).float())
    with pytest.raises(ValueError, match="whole multiple"):
        clip_loss(img, txt[:4], 7.0)


def test_perfect_alignment_gives_low_clip_loss_and_random_gives_about_log_n():
    img, _ = _embeddings(64, 32, seed=3)
    assert clip_loss(img, img, 100.0) < 0.05
    _, txt = _embeddings(64, 32, seed=4)
    assert abs(float(clip_loss(img, txt, 1.0)) - math.log(64)) < 0.1


def test_build_loss_rejects_unknown_names():
    with pytest.raises(KeyError, match="clip"):
        build_loss("infonce")


# -- distributed ---------------------------------------------------------------------------------------------

WORLD = 2
PER_RANK = 3
CAPTIONS = (1, 2)  # captions per image


DTYPES = (torch.float32, torch.float64)


def _global_batch(k: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    img, _ = _embeddings(WORLD * PER_RANK, 8, seed=5)
    _, txt = _embeddings(WORLD * PER_RANK * k, 8, seed=6)
    return img.to(dtype), txt.to(dtype)


def _global_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return torch.randn(WORLD * PER_RANK, 5, generator=g), torch.randn(WORLD * PER_RANK, 5, generator=g)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for name, k, dtype in [(n, k, t) for n in ("clip", "siglip") for k in CAPTIONS for t in DTYPES]:
        img, txt = _global_batch(k, dtype)
        local_img = img[rank * PER_RANK : (rank + 1) * PER_RANK].clone().requires_grad_(True)
        local_txt = txt[rank * PER_RANK * k : (rank + 1) * PER_RANK * k].clone().requires_grad_(True)
        if name == "clip":
            loss = clip_loss(local_img, local_txt, 12.0, distributed=True)
        else:
            loss = siglip_loss(local_img, local_txt, 10.0, -4.0, distributed=True)
        loss.backward()
        results[name, k, dtype] = (loss.detach(), local_img.grad, local_txt.grad)
    view_a, view_b = _global_views()
    local_a = view_a[rank * PER_RANK : (rank + 1) * PER_RANK].clone().requires_grad_(True)
    local_b = view_b[rank * PER_RANK : (rank + 1) * PER_RANK].clone().requires_grad_(True)
    loss = nt_xent_loss(local_a, local_b, 0.2, distributed=True)
    loss.backward()
    results["nt_xent"] = (loss.detach(), local_a.grad, local_b.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT at exit otherwise)
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(sys.platform == "win32", reason="gloo file init")
def test_gathered_losses_equal_single_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, k in [(n, k) for n in ("clip", "siglip") for k in CAPTIONS]:
        img, txt = _global_batch(k)
        full_img, full_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        if name == "clip":
            single = clip_loss(full_img, full_txt, 12.0)
        else:
            single = siglip_loss(full_img, full_txt, 10.0, -4.0)
        single.backward()
        mean_loss = sum(r[name, k, torch.float32][0] for r in per_rank) / WORLD
        torch.testing.assert_close(mean_loss, single.detach(), rtol=1e-5, atol=1e-6)
        for r in range(WORLD):
            rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
            text_rows = slice(r * PER_RANK * k, (r + 1) * PER_RANK * k)
            # DDP averages gradients over ranks: rank gradient / WORLD must equal the single-process one
            _, g_img, g_txt = per_rank[r][name, k, torch.float32]
            torch.testing.assert_close(g_img / WORLD, full_img.grad[rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(g_txt / WORLD, full_txt.grad[text_rows], rtol=1e-4, atol=1e-6)
        # float64 stays float64 through the gather: the ranks agree with the plain reference to 1e-10
        img, txt = _global_batch(k, torch.float64)
        if name == "clip":
            ref = _value_and_grads(reference_clip_k, img, txt, 12.0, k)
        else:
            ref = _value_and_grads(reference_siglip_k, img, txt, 10.0, -4.0, k)
        ranks = [per_rank[r][name, k, torch.float64] for r in range(WORLD)]
        _assert_float64_close((sum(r[0] for r in ranks) / WORLD,), (ref[0],))
        _assert_float64_close(
            (torch.cat([r[1] for r in ranks]) / WORLD, torch.cat([r[2] for r in ranks]) / WORLD), ref[1:]
        )
    # NT-Xent: every rank's queries meet all ranks' candidates, with the contrastive losses' contract
    view_a, view_b = (v.clone().requires_grad_(True) for v in _global_views())
    single = nt_xent_loss(view_a, view_b, 0.2)
    single.backward()
    ranks = [per_rank[r]["nt_xent"] for r in range(WORLD)]
    torch.testing.assert_close(sum(r[0] for r in ranks) / WORLD, single.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / WORLD, view_a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / WORLD, view_b.grad, rtol=1e-4, atol=1e-6)


def reference_smoothed_clip(img, txt, scale, k, eps):
    """Cross-entropy against explicit smoothed target rows: (1 - eps) over each row's matches + eps uniform."""
    b = img.shape[0]
    logits = scale * img @ txt.T  # (B, B*k)
    target_i = torch.full_like(logits, eps / logits.shape[1])
    target_t = torch.full_like(logits.T, eps / b)
    for i in range(b):
        for j in range(k):
            target_i[i, i * k + j] += (1 - eps) / k
            target_t[i * k + j, i] += 1 - eps
    loss_i = -(target_i * logits.log_softmax(dim=1)).sum(1).mean()
    loss_t = -(target_t * logits.T.log_softmax(dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


@pytest.mark.parametrize("k", [1, 3])
def test_label_smoothing_is_cross_entropy_against_smoothed_targets(k: int) -> None:
    img, txt = _float64_pair(6, k, seed=5)
    for eps in (0.0, 0.1, 0.4):
        ours = clip_loss(img, txt, 10.0, label_smoothing=eps)
        assert ours.item() == pytest.approx(reference_smoothed_clip(img, txt, 10.0, k, eps).item(), abs=1e-10)
    smoothed, plain = clip_loss(img, txt, 10.0, label_smoothing=0.1), clip_loss(img, txt, 10.0)
    assert abs(smoothed.item() - plain.item()) > 1e-3  # not a no-op
    if k == 1:  # one match per row: exactly torch's own label smoothing on both sides
        logits = 10.0 * img @ txt.T
        target = torch.arange(6)
        torch_ls = (F.cross_entropy(logits, target, label_smoothing=0.2) + F.cross_entropy(logits.T, target, label_smoothing=0.2)) / 2  # fmt: skip
        assert clip_loss(img, txt, 10.0, label_smoothing=0.2).item() == pytest.approx(
            torch_ls.item(), abs=1e-10
        )
    with pytest.raises(ValueError, match="label_smoothing"):
        clip_loss(img, txt, 10.0, label_smoothing=1.0)
    with pytest.raises(ValueError, match="clip loss"):
        build_loss("siglip", label_smoothing=0.1)


# -- SLIP: NT-Xent and the SimCLR term beside the contrastive loss ---------------------------------------------


def reference_nt_xent(a, b, temperature):
    """SimCLR's loss written out query by query: 2B queries, each against every vector but itself."""
    z = torch.cat([F.normalize(a, dim=-1), F.normalize(b, dim=-1)])
    n = a.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = torch.stack([z[i] @ z[j] / temperature for j in range(2 * n) if j != i])
        total = total - (z[i] @ z[positive] / temperature - torch.logsumexp(others, 0))
    return total / (2 * n)


def test_nt_xent_matches_loop_reference_in_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 7, generator=g), 3 * torch.randn(5, 7, generator=g)  # any scale: normalised inside
    for temperature in (0.1, 0.5):
        ours = _value_and_grads(lambda x, y, t: nt_xent_loss(x, y, t), a, b, temperature)
        ref = _value_and_grads(reference_nt_xent, a, b, temperature)
        _assert_float64_close(ours, ref)
    assert nt_xent_loss(a, b, 0.1).dtype == torch.float32
    with pytest.raises(ValueError, match="two views"):
        nt_xent_loss(a, b[:4], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(a, b, 0.0)


def test_nt_xent_is_lower_for_two_identical_views_than_for_unrelated_ones() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    same, unrelated = nt_xent_loss(a, a, 0.1), nt_xent_loss(a, b, 0.1)
    assert same.item() < unrelated.item() - 1.0


def test_slip_loss_is_the_contrastive_loss_on_view_zero_plus_weighted_simclr_on_both() -> None:
    from clipcraft.model import ClipOutput

    torch.manual_seed(0)
    ssl = SimClrLoss(in_features=6, hidden=8, dim=4, temperature=0.2)
    slip = SlipLoss(ClipLoss(), ssl, weight=0.5)
    img, txt = _embeddings(8, 5, seed=2)  # 8 image rows: two views of 4 images
    feats = torch.randn(8, 6)
    out = ClipOutput(img, txt[:4], torch.tensor(10.0), torch.tensor(0.0), image_features=feats)
    expected = clip_loss(img[0::2], txt[:4], 10.0) + 0.5 * ssl(feats[0::2], feats[1::2])
    torch.testing.assert_close(slip(out), expected)
    assert slip.last_ssl.item() == pytest.approx(ssl(feats[0::2], feats[1::2]).item())
    assert {n.split(".")[0] for n, _ in slip.named_parameters()} == {"ssl"}  # the head is the loss's
    with pytest.raises(ValueError, match="two views"):
        slip(ClipOutput(img[:7], txt[:7], torch.tensor(10.0), torch.tensor(0.0), image_features=feats[:7]))
    with pytest.raises(ValueError, match="positive"):
        SlipLoss(ClipLoss(), ssl, weight=0.0)
