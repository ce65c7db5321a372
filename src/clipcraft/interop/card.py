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


_METRIC_WORDS = ("top1", "top5", "recall", "_r1", "_r5", "_r10", "median_rank", "score", "kept")


def _metrics(summary: dict[str, Any], prefix: str = "", depth: int = 0) -> dict[str, float]:
    """The numeric accuracy/recall entries of a run summary, nested sections flattened (``test_wise_top1``);
    the bad-data report and per-step lists are left out."""
    out: dict[str, float] = {}
    for key, value in sorted(summary.items()):
        name = f"{prefix}{key}" if key != "metrics" else prefix.rstrip("_")
        if isinstance(value, dict) and depth < 3 and key not in ("bad_data", "data", "lora"):
            out.update(_metrics(value, f"{name}_" if name else "", depth + 1))
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and any(w in name for w in _METRIC_WORDS)
        ):
            out[name] = float(value)
    return out


def model_card(model: Any, transformers_class: str | None = None, run: dict[str, Any] | None = None) -> str:
    """The card's text for ``model``; ``transformers_class`` when written by the transformers export,
    ``run`` as returned by :func:`read_run` when the model came from a training run."""
    scale = float(model.logit_scale.detach().exp())
    return render_card(model.config, scale, float(model.logit_bias.detach()), transformers_class, run)


def write_card(model_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """(Re)write the card of a saved model directory, with the run of ``run_dir`` (its ``summary.json`` and
    ``config.yaml``; a training job calls this once its summary exists). Reads the config and the two
    temperature tensors only, not the model."""
    from safetensors import safe_open

    from clipcraft.model import WEIGHTS_FILE, read_config

    root = Path(model_dir)
    config = read_config(root)
    with safe_open(str(root / WEIGHTS_FILE), framework="pt") as fh:
        scale = float(fh.get_tensor("logit_scale").exp())
        bias = float(fh.get_tensor("logit_bias"))
    run = read_run(Path(run_dir)) if run_dir is not None else None
    (root / CARD_FILE).write_text(render_card(config, scale, bias, None, run))
    return root / CARD_FILE


def render_card(
    cfg: Any,
    logit_scale: float,
    logit_bias: float,
    transformers_class: str | None,
    run: dict[str, Any] | None,
) -> str:
    """The card of a model with config ``cfg`` and temperature ``logit_scale`` (the multiplier, not its log)."""
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
        f"{cfg.text.max_length} tokens, padding `{cfg.text.padding}` -> {cfg.head.kind_of('text')} head.",
        f"- Logit scale (exp): {logit_scale:.4g}; logit bias: {logit_bias:.4g}.",
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
