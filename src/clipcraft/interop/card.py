"""The model card: README.md in the Hugging Face card format (YAML front matter, then Markdown).

Written by :meth:`ClipModel.save` beside ``config.json`` and by the transformers export. It states what is
known and nothing else: the towers and preprocessing from the config; where the model came from
(``config.source``); training data, recipe and test metrics when the model was saved by a training or
fine-tuning run (its ``config.yaml`` and ``summary.json``, read from the run directory).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
# data folders clipcraft knows by name -> the Hub dataset id of the same data
_KNOWN_DATASETS = {"flickr8k": "jxie/flickr8k", "flickr30k": "nlphuji/flickr30k", "cifar10": "cifar10"}


def read_run(run_dir: Path) -> dict[str, Any]:
    """``{"config": ..., "summary": ...}`` of a training run directory (each absent when its file is)."""
    out: dict[str, Any] = {}
    summary = run_dir / "summary.json"
    if summary.is_file():
        with contextlib.suppress(ValueError):
            out["summary"] = json.loads(summary.read_text())
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        try:
            data = yaml.safe_load(config.read_text())
            if isinstance(data, dict):
                out["config"] = data
        except yaml.YAMLError:
            pass
    return out


def _metrics(summary: dict[str, Any]) -> dict[str, float]:
    found = summary.get("metrics", summary)
    return {
        k: float(v)
        for k, v in sorted(found.items())
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k.startswith(("test_", "val", "top", "i2t", "t2i", "mean"))
    }


def model_card(model: Any, transformers_class: str | None = None, run: dict[str, Any] | None = None) -> str:
    """The card's text for ``model``; ``transformers_class`` when written by the transformers export,
    ``run`` as returned by :func:`read_run` when the model came from a training run."""
    cfg = model.config
    run = run or {}
    train_cfg = run.get("config") or {}
    metrics = _metrics(run.get("summary") or {})
    data = str(train_cfg.get("data") or train_cfg.get("train") or "")
    datasets = sorted({hub for key, hub in _KNOWN_DATASETS.items() if key in data.lower()})
    tags = ["clip", "clipcraft", "zero-shot-image-classification", "image-text-retrieval"]
    if cfg.image.kind == "timm":
        tags.append("timm")
    front = ["---", f"library_name: {'transformers' if transformers_class else 'clipcraft'}"]
    front.append("pipeline_tag: zero-shot-image-classification")
    front.append("tags:")
    front += [f"- {t}" for t in tags]
    if datasets:
        front.append("datasets:")
        front += [f"- {d}" for d in datasets]
    if metrics:
        front.append("metrics:")
        front += ["- recall" if any("r1" in k or "recall" in k for k in metrics) else "- accuracy"]
    front.append("---")
    p = cfg.image.preprocess
    lines = [
        "",
        "# CLIP dual encoder (clipcraft)",
        "",
        "## Towers",
        f"- Image tower: {cfg.image.kind} `{cfg.image.name}` -> {cfg.head.kind} head -> {cfg.embed_dim}-d embeddings.",
        f"- Text tower: {cfg.text.kind} `{cfg.text.name}`, pooling `{cfg.text.pooling}`, at most "
        f"{cfg.text.max_length} tokens, padding `{cfg.text.padding}` -> {cfg.head.kind} head.",
        f"- Logit scale (exp): {float(model.logit_scale.detach().exp()):.4g}; logit bias: {float(model.logit_bias.detach()):.4g}.",
        "",
        "## Preprocessing",
    ]
    if p is not None:
        lines.append(
            f"Input {p.input_size[1]}x{p.input_size[2]} RGB, {p.interpolation} resize, crop mode `{p.crop_mode}` "
            f"(crop_pct {p.crop_pct:g}), mean {tuple(round(x, 4) for x in p.mean)}, "
            f"std {tuple(round(x, 4) for x in p.std)}."
        )
    source = cfg.source or {}
    lines += ["", "## Origin and training"]
    if source:
        lines.append(
            f"Imported from {source.get('format')} `{source.get('name')}`"
            + (f" (checkpoint `{source['checkpoint']}`)" if source.get("checkpoint") else "")
            + "."
        )
    if train_cfg:
        keys = ("data", "train", "model", "init", "method", "loss", "epochs", "batch_size", "lr", "lr_image_tower",
                "lr_heads", "lock_image", "lock_text", "precision", "lora_rank", "lora_towers")  # fmt: skip
        recipe = ", ".join(f"{k}={train_cfg[k]}" for k in keys if k in train_cfg)
        lines.append(f"Trained by clipcraft with: {recipe}.")
    elif not source:
        lines.append("No training run recorded with this model.")
    if metrics:
        lines += ["", "## Metrics (from the run's summary.json)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    lines += ["", "## How to load", ""]
    if transformers_class:
        lines += [
            "```python",
            f"from transformers import AutoModel, AutoTokenizer  # {transformers_class}",
            'model = AutoModel.from_pretrained("PATH")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
            "```",
        ]
    else:
        lines += [
            "```python",
            "import clipcraft",
            'model = clipcraft.load("PATH")  # offline: config, weights and tokenizer are in this folder',
            'emb = model.encode_images(["photo.jpg"]); txt = model.encode_texts(["a photo of a dog"])',
            "```",
        ]
    return "\n".join(front + lines) + "\n"
