"""Adapting without forgetting: FLYP's contrastive step, layer-wise learning-rate decay, whole-model weight
mixing and the retention measurement. The loop in :mod:`clipcraft.finetune.loop` uses them.

- **FLYP** (Goyal et al. 2022, "Finetune like you pretrain"): the classifier is the text tower's class
  embeddings (the zero-shot head); each training image is paired with a prompt of its class ("a photo of a
  {class}." with a template drawn per image) and both towers train with the CLIP loss, as in pre-training.
  The head is recomputed from the text tower whenever the classifier is evaluated.
- **Layer-wise learning-rate decay**: in an unlocked tower with n blocks, block i (0-based) trains at
  ``lr * decay**(n - i)``, what precedes the first block (patch/token embeddings) at ``lr * decay**(n + 1)``
  and what follows the last (final norm, pooling head) at ``lr``: early, general layers move least.
- **Retention**: how much of the initial model's own ability survives, measured on a second data set named by
  the user: zero-shot top-1 on class folders, or mean retrieval recall on image-caption data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clipcraft.errors import ClipcraftError


def refresh_head(classifier: Any) -> None:
    """Set ``classifier.head`` to the current text tower's class embeddings (templates averaged, as the
    zero-shot classifier builds them) and the model's current temperature; bias to zero."""
    from clipcraft.evaluation.zeroshot import ZeroShotClassifier

    zeroshot = ZeroShotClassifier(classifier.model, classifier.classnames, classifier.templates)
    with torch.no_grad():
        classifier.head.weight.copy_(torch.from_numpy(zeroshot.weights).to(classifier.head.weight))
        classifier.head.bias.zero_()
        classifier.head.scale.fill_(float(zeroshot.logit_scale))


def class_prompts(
    labels: Tensor, classnames: Sequence[str], templates: Sequence[str], seed: int
) -> list[str]:
    """One caption per image: its class name in a template drawn by a generator seeded with ``seed`` (the
    run seed and step, so a resumed run draws the same prompts)."""
    rng = random.Random(seed)
    return [templates[rng.randrange(len(templates))].format(classnames[int(i)]) for i in labels]


def flyp_step_logits(
    model: Any, pixels: Tensor, captions: list[str], loss_fn: nn.Module
) -> tuple[Tensor, Tensor]:
    """The CLIP loss of images (B, 3, H, W) against their class captions (B,), and the (B, B) image->caption
    logits. Captions of the same class count as negatives, as in FLYP."""
    tokens = {k: v.to(pixels.device) for k, v in model.tokenize(captions).items()}
    out = model(images=pixels, texts=tokens)
    return loss_fn(out), out.logits_per_image().detach()


def _block_of(part: str, name: str) -> int | None:
    from clipcraft.towers import _HF_IMAGE_BLOCK, _IMAGE_BLOCK, _TEXT_BLOCK, _block_index

    if part == "image_tower":
        block = _block_index(
            _IMAGE_BLOCK, name
        )  # timm: trunk.blocks.N. ; transformers: trunk.encoder.layers.N.
        return block if block is not None else _block_index(_HF_IMAGE_BLOCK, name)
    return _block_index(_TEXT_BLOCK, name)


def layer_scales(module: nn.Module, part: str, decay: float) -> dict[str, float]:
    """Learning-rate multiplier of every parameter of tower ``module`` (names relative to the tower) under
    layer-wise decay ``decay`` in (0, 1]; 1.0 everywhere when ``decay`` is 1 or the tower has no blocks."""
    names = [n for n, _ in module.named_parameters()]
    blocks = {n: _block_of(part, n) for n in names}
    found = sorted({b for b in blocks.values() if b is not None})
    if decay == 1.0 or not found:
        return dict.fromkeys(names, 1.0)
    depth = found[-1] + 1
    scales, seen_block = {}, False
    for name in names:
        block = blocks[name]
        if block is not None:
            seen_block = True
            scales[name] = decay ** (depth - block)
        else:
            scales[name] = 1.0 if seen_block else decay ** (depth + 1)
    return scales


def adapt_param_groups(classifier: Any, config: Any) -> list[dict]:
    """AdamW groups for FLYP or layer-wise decay: each tower's trainable parameters by (learning-rate scale,
    decayed or not); heads at their tower's rate; logit scale at ``lr_text``; the classifier head (CE only)
    at ``lr_head``. Weight decay on matrices only; frozen parameters left out."""
    decay_wd = config.optim.weight_decay
    model = classifier.model
    buckets: dict[tuple[str, float, bool], list[nn.Parameter]] = {}
    rates = {"image_tower": config.lr_tower, "text_tower": config.lr_text, "image_head": config.lr_tower,
             "text_head": config.lr_text, "logit": config.lr_text}  # fmt: skip
    for part in ("image_tower", "text_tower"):
        tower = getattr(model, part)
        scales = layer_scales(tower, part, config.layer_decay)
        for name, param in tower.named_parameters():
            if param.requires_grad:
                buckets.setdefault((part, scales[name], param.ndim >= 2), []).append(param)
    for part in ("image_head", "text_head"):
        for param in getattr(model, part).parameters():
            if param.requires_grad:
                buckets.setdefault((part, 1.0, param.ndim >= 2), []).append(param)
    for param in (model.logit_scale, model.logit_bias):
        if param.requires_grad:
            buckets.setdefault(("logit", 1.0, False), []).append(param)
    groups = [
        {
            "name": f"{part}{'' if scale == 1.0 else f'_x{scale:.3g}'}{'' if wd else '_no_decay'}",
            "params": params,
            "lr": rates[part] * scale,
            "weight_decay": decay_wd if wd and part != "logit" else 0.0,
        }
        for (part, scale, wd), params in sorted(
            buckets.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])
        )
    ]
    head = [p for p in classifier.head.parameters() if p.requires_grad]
    if head:
        groups.append({"name": "classifier", "params": [p for p in head if p.ndim >= 2], "lr": config.lr_head,
                       "weight_decay": decay_wd})  # fmt: skip
        groups.append({"name": "classifier_no_decay", "params": [p for p in head if p.ndim < 2],
                       "lr": config.lr_head, "weight_decay": 0.0})  # fmt: skip
    return [g for g in groups if g["params"]]


def measure_retention(
    model: Any, data: str, split: str | None, limit: int | None, precision: Any, batch_size: int = 64
) -> dict[str, Any]:
    """The initial model's ability kept by ``model``: zero-shot top-1 when ``data`` is class folders (a split
    root with ``split``/ inside, or the folder itself), else mean retrieval recall (R@1/5/10 both ways) of
    image-caption data (Flickr folder, CSV/JSONL, COCO). Returns ``{"kind", "score", ...metrics}``."""
    from pathlib import Path

    from clipcraft.encoding import EncodeSettings
    from clipcraft.evaluation.runners import _looks_like_class_folder, evaluate_retrieval, evaluate_zeroshot

    settings = EncodeSettings(precision=precision, batch_size=batch_size)
    root = Path(data)
    folder = root / split if split and (root / split).is_dir() else root
    if root.is_dir() and _looks_like_class_folder(folder) and not (root / "captions.txt").is_file():
        result = evaluate_zeroshot(model, folder, limit_per_class=limit, settings=settings)
        return {"kind": "zeroshot_top1", "score": float(result["top1"]), "num_images": result["num_images"]}
    result = evaluate_retrieval(model, data, split=split, limit=limit, settings=settings)
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    missing = [k for k in keys if k not in result]
    if missing:
        raise ClipcraftError(f"Retention data {data}: retrieval gave no {missing}.")
    score = sum(float(result[k]) for k in keys) / len(keys)
    return {"kind": "retrieval_mean_recall", "score": score, "num_images": result["num_images"],
            **{k: float(result[k]) for k in keys}}  # fmt: skip
