"""Hyper-parameter sweep of the offline recipe (Flickr8k, MiniLM locked and cached, ViT-Tiny from scratch) on a
GPU, from a small data pack, to choose the settings that ``configs/flickr8k-minilm-vit-tiny.yaml`` then runs on
the CPU.

The CPU recipe affords one 60-minute run at a time, so a sweep of a dozen settings there would take a day. On a
GPU a whole run takes one to three minutes, but the GPU machine cannot read ../shared/data and takes at most
64 MiB along. Hence two steps:

    # here (CPU): 7,000 train + val images as 112 px centre squares (JPEG q90), the MiniLM features of their
    # 35,000 captions (int8, one scale per row), and 2,000 CIFAR-10 test images with the MiniLM features of
    # the zero-shot prompts: about 57 MiB
    .venv/bin/python bench/sweep_recipe.py pack --data ../shared/data/flickr8k --out .pack
    # on the GPU machine: every setting of the grid, several processes at once
    python bench/sweep_recipe.py run --pack .pack --out results.json --budget 420

The sweep's training step is the recipe's: ``clipcraft.create_model`` with the recipe's overrides, the
trainer's optimizer groups and warmup + cosine schedule (``clipcraft.train.optim``), ``clip_loss`` /
``siglip_loss`` over the k cached captions of each image, ``clamp_logit_scale``, and validation recall from
``clipcraft.evaluation.retrieval`` on the 1,000 val images x 5,000 captions, plus CIFAR-10 zero-shot top-1
with the zero-shot head of ``clipcraft.evaluation.zeroshot`` on the packed test images. What differs from the
CPU run, and why the sweep only ranks settings (the chosen one is then measured on the CPU): images come from
112 px centre squares rather than the full photo (the random crop is the same kind, scale and ratio, done on
the GPU with ``grid_sample``), matrix products use TF32, and caption features are int8-rounded.

Two training levers are sweepable beside the grid's settings (pass them with ``--grid``): ``ssl_weight``
(with ``ssl_temperature``, ``ssl_hidden``, ``ssl_dim``) adds SLIP's SimCLR term on a second random crop of
each image (``clipcraft.losses.SlipLoss``, its head in its own optimizer groups as the trainer does), and
``text_variants: V`` shows each caption or one of its first V augmented variants, drawn per step. The
variants' features come from the pack: ``pack --text-variants V`` encodes V variants of every training
caption (``clipcraft.data.text_augment.caption_variant``, seed 0, ``--text-strength``), about 11 MiB per
variant at Flickr8k's 30,000 captions, so a pack with variants needs room (fewer train images, or no
CIFAR part) to stay within the 64 MiB the GPU machine takes::

    python bench/sweep_recipe.py run --pack .pack --grid '[{}, {"ssl_weight": 1.0}, {"text_variants": 2}]'
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SIZE = 112  # side of the stored centre squares

# The recipe as shipped in configs/flickr8k-minilm-vit-tiny.yaml before patch dropout (lr 3e-4, 34 epochs).
# The first sweep (bench/results/gpu/sweep-recipe.json) ran from lr 1e-3 at 35 epochs and chose lr 3e-4.
BASE: dict[str, Any] = {
    "epochs": 34,
    "batch_size": 128,
    "lr": 3e-4,
    "weight_decay": 0.1,
    "warmup_steps": 100,
    "min_lr_ratio": 0.0,
    "crop_scale": (0.5, 1.0),
    "hflip": 0.5,
    "captions_per_image": 5,
    "loss": "clip",
    "img_size": 96,
    "seed": 0,
    "lowres": 0.0,  # probability of the low-resolution augmentation (see low_resolution)
    "ssl_weight": 0.0,  # SLIP: weight of the SimCLR term on a second crop (0: off)
    "ssl_temperature": 0.1,
    "ssl_hidden": 512,
    "ssl_dim": 128,
    "text_variants": 0,  # show each caption or one of its first N packed variants (0: originals only)
    "model_overrides": {},  # extra dotted ModelConfig keys
}

# One change (or a few) from BASE per row. Epoch counts of the patch-dropout rows fill the same 60 CPU minutes
# as 34 epochs at 96 px without it: on the 2-core CPU a ViT-Tiny step at batch 128 takes 0.55x the time with
# half of the 36 patches dropped, 0.29x with three quarters, and 0.64x / 0.51x at 112 px (49 patches) with
# 0.5 / 0.6 dropped; the loader and validation add a fixed part per epoch.
PD = "image.model_kwargs.patch_drop_rate"
T03 = math.log(1 / 0.03)
GRID: list[dict[str, Any]] = [  # in priority order: rows that do not fit the time budget are the last ones
    {},
    {"model_overrides": {PD: 0.5}, "epochs": 52},
    {"model_overrides": {PD: 0.5}, "epochs": 52, "seed": 1},
    {"seed": 1},
    {"model_overrides": {PD: 0.75}, "epochs": 80},
    {"img_size": 112, "model_overrides": {PD: 0.6}, "epochs": 52},
    {"img_size": 112, "model_overrides": {PD: 0.5}, "epochs": 45},
    {"model_overrides": {PD: 0.25}, "epochs": 42},
    {"epochs": 52},  # control: the longer schedule without patch dropout
    {"model_overrides": {PD: 0.5}, "epochs": 52, "lr": 5e-4},
    {"model_overrides": {PD: 0.5, "init_logit_scale": T03}, "epochs": 52},
    {"model_overrides": {"init_logit_scale": T03}},
    {"model_overrides": {PD: 0.5, "image.model_kwargs.drop_path_rate": 0.1}, "epochs": 52},
    {"model_overrides": {PD: 0.5}, "epochs": 52, "crop_scale": (0.25, 1.0)},
    {"model_overrides": {PD: 0.5}, "epochs": 52, "loss": "siglip"},
    {"model_overrides": {PD: 0.5}, "epochs": 52, "weight_decay": 0.2},
]


# ----------------------------------------------------------------------------------------------------------
# pack (CPU)


def _square(path: str, size: int) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale, much faster
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue()


def _text_features(model: Any, texts: list[str]) -> np.ndarray:
    """(N, F) float32 text tower features in fp32, as the trainer's text cache computes them."""
    return model.encode_texts(texts, batch_size=256, project=False, normalize=False, precision="fp32")


def pack(args: argparse.Namespace) -> int:
    import clipcraft
    from clipcraft.data import open_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    model = clipcraft.create_model("minilm-vit-tiny")  # the real MiniLM (installed package)
    meta_path = out / "meta.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update({"size": SIZE})
    meta.setdefault("splits", {})
    for split in [p for p in parts if p in ("train", "val")]:
        ds = open_dataset(args.data, split=split)
        blobs = [_square(r.image, SIZE) for r in ds.records]
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        (out / f"{split}-images.bin").write_bytes(b"".join(blobs))
        np.save(out / f"{split}-image-offsets.npy", offsets)
        captions = [c for r in ds.records for c in r.captions]
        counts = np.array([len(r.captions) for r in ds.records], dtype=np.int64)
        feats = _text_features(model, captions)  # the trainer's text-cache features
        scale = np.abs(feats).max(axis=1, keepdims=True) / 127.0
        np.save(out / f"{split}-text-int8.npy", np.round(feats / scale).astype(np.int8))
        np.save(out / f"{split}-text-scale.npy", scale.astype(np.float32))
        np.save(out / f"{split}-caption-counts.npy", counts)
        if split == "train" and args.text_variants:
            meta["text_variants"] = _pack_variants(
                model, captions, args.text_variants, args.text_strength, out
            )
        meta["splits"][split] = {
            "images": len(blobs),
            "captions": len(captions),
            "image_bytes": int(offsets[-1]),
        }
        print(
            f"{split}: {len(blobs)} images ({offsets[-1] / 2**20:.1f} MiB), {len(captions)} captions",
            flush=True,
        )
    if "cifar" in parts:
        meta["cifar"] = _pack_cifar(model, Path(args.cifar), args.cifar_per_class, out)
    pre = model.config.image.preprocess  # resolved when the model was built
    meta["preprocess"] = {"mean": list(pre.mean), "std": list(pre.std), "crop_pct": pre.crop_pct}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return 0


def _pack_variants(model: Any, captions: list[str], variants: int, strength: float, out: Path) -> dict:
    """The text-tower features of variants 1 ... ``variants`` of every training caption, as
    ``train-text-variants-int8.npy`` (V, C, F) with one scale per row in ``train-text-variants-scale.npy``."""
    from clipcraft.data.text_augment import caption_variant

    quantized, scales = [], []
    for v in range(1, variants + 1):
        feats = _text_features(model, [caption_variant(c, v, strength, seed=0) for c in captions])
        scale = np.abs(feats).max(axis=1, keepdims=True) / 127.0
        quantized.append(np.round(feats / scale).astype(np.int8))
        scales.append(scale.astype(np.float32))
    np.save(out / "train-text-variants-int8.npy", np.stack(quantized))
    np.save(out / "train-text-variants-scale.npy", np.stack(scales))
    print(f"train: {variants} variants of {len(captions)} captions (strength {strength})", flush=True)
    return {"variants": variants, "strength": strength, "seed": 0}


def _pack_cifar(model: Any, root: Path, per_class: int, out: Path) -> dict[str, Any]:
    """The first ``per_class`` images of each class of ``root`` (by default CIFAR-10 *train*: settings are
    chosen on training images, the test split is for final figures only) (uint8, N x 32 x 32 x 3), their labels,
    and the text-tower features of every prompt (class-major: class c, template t at row c * T + t), which
    the sweep turns into the zero-shot head of ``clipcraft.evaluation.zeroshot.build_classifier_weights``."""
    from clipcraft.evaluation.labelled import read_class_folder
    from clipcraft.images import load_image
    from clipcraft.templates import DEFAULT_TEMPLATES

    data = read_class_folder(root, limit_per_class=per_class)
    images = np.stack([np.asarray(load_image(p)) for p in data.paths])
    np.save(out / "cifar-images.npy", images.astype(np.uint8))
    np.save(out / "cifar-labels.npy", data.labels.astype(np.int64))
    prompts = [t.replace("{}", name) for name in data.classnames for t in DEFAULT_TEMPLATES]
    np.save(out / "cifar-prompt-features.npy", _text_features(model, prompts).astype(np.float32))
    print(f"cifar: {len(images)} images of {root}, {len(prompts)} prompts", flush=True)
    return {"classnames": data.classnames, "templates": len(DEFAULT_TEMPLATES), "images": len(images)}


# ----------------------------------------------------------------------------------------------------------
# run (GPU)


class Split:
    """One split of the pack on the device: images (N, 3, S, S) uint8, caption features (C, F) float32,
    and per image the first caption row and the caption count; ``versions`` (1 + V, C, F) holds the
    caption features followed by those of the V packed caption variants (V = 0 without them)."""

    def __init__(self, root: Path, split: str, device: torch.device) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        blob = (root / f"{split}-images.bin").read_bytes()
        offsets = np.load(root / f"{split}-image-offsets.npy")

        def decode(i: int) -> np.ndarray:
            with Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]])) as im:
                return np.asarray(im.convert("RGB"))

        with ThreadPoolExecutor(8) as pool:
            arrays = list(pool.map(decode, range(len(offsets) - 1)))
        self.images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(device)
        q = np.load(root / f"{split}-text-int8.npy").astype(np.float32)
        self.text = torch.from_numpy(q * np.load(root / f"{split}-text-scale.npy")).to(device)
        self.versions = self.text[None]
        packed = root / f"{split}-text-variants-int8.npy"
        if packed.is_file():
            v = np.load(packed).astype(np.float32) * np.load(root / f"{split}-text-variants-scale.npy")
            self.versions = torch.cat([self.versions, torch.from_numpy(v).to(device)])
        counts = np.load(root / f"{split}-caption-counts.npy")
        self.counts = torch.from_numpy(counts).to(device)
        self.first = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]])).to(device)
        self.text_to_image = np.repeat(np.arange(len(counts)), counts)

    def caption_rows(self, idx: torch.Tensor, start: torch.Tensor, k: int) -> torch.Tensor:
        """(B*k,) caption rows: captions start..start+k-1 (wrapping) of each image, image-major."""
        j = (start[:, None] + torch.arange(k, device=idx.device)[None, :]) % self.counts[idx][:, None]
        return (self.first[idx][:, None] + j).reshape(-1)


class Cifar:
    """The pack's CIFAR-10 part on the device: images (N, 3, 32, 32) uint8, labels (N,), prompt features
    (C * T, F) float32 (class-major)."""

    def __init__(self, root: Path, meta: dict, device: torch.device) -> None:
        self.images = torch.from_numpy(np.load(root / "cifar-images.npy")).permute(0, 3, 1, 2).contiguous()
        self.images = self.images.to(device)
        self.labels = torch.from_numpy(np.load(root / "cifar-labels.npy")).to(device)
        self.prompts = torch.from_numpy(np.load(root / "cifar-prompt-features.npy")).to(device)
        self.classes, self.templates = len(meta["classnames"]), int(meta["templates"])

    @classmethod
    def open(cls, root: Path, meta: dict, device: torch.device) -> Cifar | None:
        return cls(root, meta["cifar"], device) if "cifar" in meta else None


def random_resized_crop(
    images: torch.Tensor, out: int, scale: tuple[float, float], hflip: float, gen: torch.Generator
) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> (B, 3, out, out) float in [0, 1]: per-image random area fraction in ``scale``,
    aspect ratio log-uniform in [3/4, 4/3], random position, bilinear resampling, flip with prob ``hflip``."""
    b, dev = images.shape[0], images.device
    area = torch.empty(b, device=dev).uniform_(*scale, generator=gen)
    log_r = torch.empty(b, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = log_r.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # crop width and height as fractions of the side
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, device=dev, generator=gen) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates
    cy = (torch.rand(b, device=dev, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, device=dev, generator=gen) < hflip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = torch.nn.functional.affine_grid(theta, [b, 3, out, out], align_corners=False)
    x = images.float() / 255.0
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def low_resolution(x: torch.Tensor, prob: float, side: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1]: each image with probability ``prob`` shrunk to ``side`` x ``side`` (area
    averaging) and enlarged back (bicubic), the blur of a small photo shown large; the rest unchanged."""
    if prob <= 0:
        return x
    pick = torch.rand(x.shape[0], device=x.device, generator=gen) < prob
    if not bool(pick.any()):
        return x
    small = torch.nn.functional.interpolate(x[pick], size=(side, side), mode="area")
    big = torch.nn.functional.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False)
    out = x.clone()
    out[pick] = big.clamp(0, 1)
    return out


def eval_crop(images: torch.Tensor, out: int, crop_pct: float) -> torch.Tensor:
    """Eval transform on the stored squares: resize to out / crop_pct, centre crop ``out``."""
    size = int(math.floor(out / crop_pct))
    x = torch.nn.functional.interpolate(
        images.float() / 255.0, size=(size, size), mode="bicubic", antialias=True
    )
    top = (size - out) // 2
    return x[:, :, top : top + out, top : top + out].clamp(0, 1)


def zeroshot_top1(
    model: Any, data: Cifar, img_size: int, crop_pct: float, mean: torch.Tensor, std: torch.Tensor
) -> float:
    """CIFAR-10 top-1 with the zero-shot head of ``build_classifier_weights``: unit prompt embeddings, mean over
    templates, unit again. The 32 px images take the eval resize + centre crop to ``img_size``; ``mean`` and
    ``std`` are (1, 3, 1, 1). Call under ``torch.no_grad()`` with the model in eval mode."""
    emb = model.embed_text_features(data.prompts).reshape(data.classes, data.templates, -1)
    head = torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)  # (C, D)
    correct = 0
    for i in range(0, len(data.labels), 500):
        pixels = (eval_crop(data.images[i : i + 500], img_size, crop_pct) - mean) / std
        image = model.embed_image_features(model.image_tower(pixels))  # (n, D) unit rows
        correct += int(((image @ head.T).argmax(dim=1) == data.labels[i : i + 500]).sum())
    return correct / len(data.labels)


def train_one(
    setting: dict[str, Any],
    train: Split,
    val: Split,
    meta: dict,
    device: torch.device,
    stop_at: float = math.inf,
    cifar: Cifar | None = None,
) -> dict:
    """Train one setting of the grid from scratch and validate every 5 epochs (val recall, and CIFAR-10
    zero-shot top-1 when ``cifar`` is given); a run still going at ``stop_at`` (a ``time.time()``) ends there,
    validated, with ``stopped_at_epoch`` set."""
    import clipcraft
    from clipcraft.evaluation.retrieval import retrieval_metrics
    from clipcraft.losses import SimClrLoss, SlipLoss, build_loss
    from clipcraft.train.config import OptimConfig
    from clipcraft.train.optim import build_optimizer, build_scheduler, loss_groups, param_groups
    from clipcraft.train.validation import RECALL_KEYS

    s = {
        **BASE,
        **setting,
        "model_overrides": {**BASE["model_overrides"], **setting.get("model_overrides", {})},
    }
    torch.manual_seed(s["seed"])
    gen = torch.Generator(device=device).manual_seed(s["seed"])
    # later keys win: "image.model_kwargs.drop_path_rate" adds to the kwargs set before it
    overrides = {
        "text.lock": True,
        "image.model_kwargs": {"img_size": s["img_size"], "global_pool": "avg"},
        **s["model_overrides"],
    }
    model = clipcraft.create_model("minilm-vit-tiny", pretrained=False, overrides=overrides).to(device)
    optim = OptimConfig(
        weight_decay=s["weight_decay"], warmup_steps=s["warmup_steps"], min_lr_ratio=s["min_lr_ratio"]
    )
    # the text tower is locked; a setting that unlocks some of it trains them at the trainer's default rate
    rates = {"image_tower": s["lr"], "text_tower": 1e-5, "heads": s["lr"], "logit": s["lr"]}
    n, bs, k = len(train.counts), s["batch_size"], s["captions_per_image"]
    steps_per_epoch = n // bs  # the trainer drops the last partial batch
    total = steps_per_epoch * s["epochs"]
    loss_fn = build_loss(s["loss"])  # the trainer's: takes the ClipOutput
    if s["ssl_weight"]:  # SLIP, as the trainer builds it: the SimCLR head is the loss's
        ssl = SimClrLoss(
            model.image_tower.num_features,
            hidden=s["ssl_hidden"],
            dim=s["ssl_dim"],
            temperature=s["ssl_temperature"],
        )
        loss_fn = SlipLoss(loss_fn, ssl, s["ssl_weight"]).to(device)
    variants = s["text_variants"]
    if variants > len(train.versions) - 1:
        raise SystemExit(
            f"text_variants={variants} but the pack has {len(train.versions) - 1} caption variants: "
            f"rebuild it with `pack --text-variants {variants}`."
        )
    groups = param_groups(model, rates, optim.weight_decay) + loss_groups(
        loss_fn, s["lr"], optim.weight_decay
    )
    optimizer = build_optimizer(groups, optim)
    scheduler = build_scheduler(optimizer, optim, total)
    mean = torch.tensor(meta["preprocess"]["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta["preprocess"]["std"], device=device).view(1, 3, 1, 1)
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()

    def validate(epoch: int) -> dict[str, float]:
        model.eval()
        crop_pct = meta["preprocess"]["crop_pct"]
        with torch.no_grad():
            chunks = []
            for i in range(0, len(val.counts), 500):
                pixels = (eval_crop(val.images[i : i + 500], s["img_size"], crop_pct) - mean) / std
                chunks.append(model.embed_image_features(model.image_tower(pixels)))
            img = torch.cat(chunks)
            txt = model.embed_text_features(val.text)
            zeroshot = (
                None if cifar is None else zeroshot_top1(model, cifar, s["img_size"], crop_pct, mean, std)
            )
        model.train()
        m = retrieval_metrics(img.float().cpu().numpy(), txt.float().cpu().numpy(), val.text_to_image)
        row = {"epoch": epoch, **{key: round(float(m[key]), 4) for key in RECALL_KEYS}}
        row["recall_mean"] = round(float(np.mean([m[key] for key in RECALL_KEYS])), 4)
        if zeroshot is not None:
            row["cifar_zeroshot"] = round(zeroshot, 4)
        return row

    model.train()
    for epoch in range(1, s["epochs"] + 1):
        order = torch.randperm(n, device=device, generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * bs : (step + 1) * bs]
            x = random_resized_crop(train.images[idx], s["img_size"], s["crop_scale"], s["hflip"], gen)
            x = low_resolution(x, s["lowres"], 32, gen)
            if s["ssl_weight"]:  # a second crop of each image; rows 2i and 2i+1 are image i's two views
                x2 = random_resized_crop(train.images[idx], s["img_size"], s["crop_scale"], s["hflip"], gen)
                x = torch.stack([x, low_resolution(x2, s["lowres"], 32, gen)], dim=1).flatten(0, 1)
            start = (torch.rand(bs, device=device, generator=gen) * train.counts[idx]).long()
            rows = train.caption_rows(idx, start, k)
            version = torch.zeros_like(rows)
            if variants:  # the original caption or one of its variants, per row
                version = torch.randint(0, variants + 1, rows.shape, device=device, generator=gen)
            feats = train.versions[version, rows]
            out = model(images=(x - mean) / std, text_features=feats)
            loss = loss_fn(out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            model.clamp_logit_scale()
        stopped = time.time() > stop_at and epoch < s["epochs"]
        if epoch % 5 == 0 or epoch == s["epochs"] or stopped:
            curve.append({**validate(epoch), "loss": round(float(loss.detach()), 4)})
            if s["ssl_weight"]:
                curve[-1]["ssl_loss"] = round(float(loss_fn.last_ssl), 4)
        if stopped:
            break
    best = max(curve, key=lambda c: c["recall_mean"])
    return {
        "stopped_at_epoch": epoch if epoch < s["epochs"] else None,
        "setting": setting,
        "resolved": {key: value for key, value in s.items()},
        "final": curve[-1],
        "best_recall_mean": best["recall_mean"],
        "best_epoch": best["epoch"],
        "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1),
        "logit_scale": round(float(model.logit_scale.detach().exp()), 2),
    }


def _worker(args: argparse.Namespace) -> int:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)
    root = Path(args.pack)
    meta = json.loads((root / "meta.json").read_text())
    train, val = Split(root, "train", device), Split(root, "val", device)
    cifar = Cifar.open(root, meta, device)
    deadline = time.time() + args.budget
    hard_stop = time.time() + args.stop
    rows = [int(i) for i in args.rows.split(",")]
    with open(args.out, "a") as f:
        for i in rows:
            if time.time() > deadline:
                print(f"row {i}: skipped (budget spent)", flush=True)
                continue
            setting = GRID[i] if args.grid is None else json.loads(args.grid)[i]
            result = {"row": i, **train_one(setting, train, val, meta, device, hard_stop, cifar)}
            f.write(json.dumps(result) + "\n")
            f.flush()
            print(
                f"row {i} {setting}: val recall {result['final']['recall_mean']}, "
                f"cifar {result['final'].get('cifar_zeroshot')} in {result['seconds']} s",
                flush=True,
            )
    return 0


def run(args: argparse.Namespace) -> int:
    """Spread the grid over ``--procs`` processes (a ViT-Tiny step is launch-bound: one process leaves most of
    the GPU idle) and collect one JSON line per setting into ``--out``."""
    import subprocess

    grid = GRID if args.grid is None else json.loads(args.grid)
    parts = [list(range(p, len(grid), args.procs)) for p in range(args.procs)]
    tmp = [f"{args.out}.part{p}" for p in range(args.procs)]
    procs = []
    for p, rows in enumerate(parts):
        if not rows:
            continue
        Path(tmp[p]).unlink(missing_ok=True)
        cmd = [
            sys.executable,
            __file__,
            "_worker",
            "--pack",
            args.pack,
            "--out",
            tmp[p],
            "--device",
            args.device,
        ]
        cmd += ["--rows", ",".join(map(str, rows)), "--budget", str(args.budget), "--stop", str(args.stop)]
        if args.grid is not None:
            cmd += ["--grid", args.grid]
        procs.append(subprocess.Popen(cmd))
    codes = [proc.wait() for proc in procs]
    results = []
    for path in tmp:
        if Path(path).exists():
            results += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
            Path(path).unlink()
    results.sort(key=lambda r: r["row"])
    info = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    Path(args.out).write_text(json.dumps({"info": info, "base": BASE, "results": results}, indent=1) + "\n")
    for r in results:
        print(
            f"{r['row']:>3} {json.dumps(r['setting']):<70} {r['final']['recall_mean']:.4f} "
            f"(best {r['best_recall_mean']:.4f}) cifar {r['final'].get('cifar_zeroshot')}"
        )
    return max(codes, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="build the data pack (CPU, needs ../shared/data and the MiniLM package)")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--out", default=".pack")
    p.add_argument("--parts", default="train,val,cifar", help="which parts to (re)write: train, val, cifar")
    p.add_argument(
        "--cifar",
        default="../shared/data/cifar10/train",
        help="zero-shot proxy images: CIFAR-10 *train* (choosing settings on the test split would fit it)",
    )
    p.add_argument("--cifar-per-class", type=int, default=200)
    p.add_argument(
        "--text-variants", type=int, default=0, help="also pack N augmented variants of each train caption"
    )
    p.add_argument("--text-strength", type=float, default=0.1, help="fraction of a variant's words edited")
    for name in ("run", "_worker"):
        p = sub.add_parser(name)
        p.add_argument("--pack", default=".pack")
        p.add_argument("--out", default="sweep-recipe.json")
        p.add_argument("--device", default="cuda")
        p.add_argument("--budget", type=float, default=420, help="seconds after which no new setting starts")
        p.add_argument(
            "--stop", type=float, default=math.inf, help="seconds after which running settings end"
        )
        p.add_argument("--grid", default=None, help="JSON list of settings instead of the built-in GRID")
        if name == "run":
            p.add_argument("--procs", type=int, default=5)
        else:
            p.add_argument("--rows", required=True)
    args = parser.parse_args(argv)
    return {"pack": pack, "run": run, "_worker": _worker}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
