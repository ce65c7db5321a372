"""Named model presets, in one table.

Each preset is a :class:`~clipcraft.config.ModelConfig` plus which towers have pretrained weights by default.
Architecture configs of the text towers are carried here, so every preset builds with ``pretrained=False``
and no network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from clipcraft.config import HeadConfig, ImageTowerConfig, ModelConfig, TextTowerConfig
from clipcraft.errors import unknown_name

# Architecture configs of text towers clipcraft knows by name (values of the published config.json files).
MPNET_BASE: dict[str, Any] = {
    "model_type": "mpnet",
    "vocab_size": 30527,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 514,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "relative_attention_num_buckets": 32,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
MINILM_L6: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "type_vocab_size": 2,
    "pad_token_id": 0,
}
# A tiny BERT for tests: pairs with the built-in byte tokenizer (5 special tokens + 256 bytes).
TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 261,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "max_position_embeddings": 128,
    "type_vocab_size": 1,
    "pad_token_id": 0,
}

# Known text towers: hub id -> (architecture, pooling, max_length, normalize_features) as published.
KNOWN_TEXT_TOWERS: dict[str, tuple[dict[str, Any], str, int, bool]] = {
    "sentence-transformers/all-mpnet-base-v2": (MPNET_BASE, "mean", 384, True),
    "sentence-transformers/all-MiniLM-L6-v2": (MINILM_L6, "mean", 256, True),
}


@dataclass(frozen=True)
class Preset:
    """A named model: its config and whether each tower loads pretrained weights by default."""

    name: str
    description: str
    config: ModelConfig
    image_pretrained: bool
    text_pretrained: bool


def _text(name: str, **kwargs: Any) -> TextTowerConfig:
    arch, pooling, max_length, normalize = KNOWN_TEXT_TOWERS[name]
    return TextTowerConfig(
        name=name,
        hf_config=copy.deepcopy(arch),
        pooling=pooling,
        max_length=max_length,
        normalize_features=normalize,
        **kwargs,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="seed",
            description="The seed recipe: ViT-B/16 (augreg2 in21k->in1k) + all-mpnet-base-v2, MLP heads, 512-d.",
            config=ModelConfig(
                image=ImageTowerConfig(name="vit_base_patch16_224.augreg2_in21k_ft_in1k"),
                text=_text("sentence-transformers/all-mpnet-base-v2"),
                head=HeadConfig(kind="mlp", dropout=0.1),
                embed_dim=512,
            ),
            image_pretrained=True,
            text_pretrained=True,
        ),
        Preset(
            name="minilm-vit-tiny",
            description="Offline recipe: real all-MiniLM-L6-v2 text tower + ViT-Tiny/16 image tower (random init).",
            config=ModelConfig(
                image=ImageTowerConfig(name="vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
                text=_text("sentence-transformers/all-MiniLM-L6-v2"),
                head=HeadConfig(kind="mlp", dropout=0.1),
                embed_dim=256,
            ),
            image_pretrained=False,
            text_pretrained=True,
        ),
        Preset(
            name="clip-vit-b16-minilm",
            description="timm's OpenAI CLIP ViT-B/16 image tower (its own CLIP mean/std; pre-projection features) "
            "+ all-MiniLM-L6-v2, new MLP heads, 512-d.",
            config=ModelConfig(
                image=ImageTowerConfig(name="vit_base_patch16_clip_224.openai"),
                text=_text("sentence-transformers/all-MiniLM-L6-v2"),
                head=HeadConfig(kind="mlp", dropout=0.1),
                embed_dim=512,
            ),
            image_pretrained=True,
            text_pretrained=True,
        ),
        Preset(
            name="tiny",
            description="Tiny random towers built from configs in code (tests and smoke runs; no files needed).",
            config=ModelConfig(
                image=ImageTowerConfig(
                    name="vit_tiny_patch16_224",
                    model_kwargs={
                        "img_size": 32,
                        "patch_size": 8,
                        "embed_dim": 32,
                        "depth": 2,
                        "num_heads": 2,
                        "mlp_ratio": 2.0,
                        "global_pool": "avg",  # a random-init CLS token barely depends on the image
                    },
                ),
                text=TextTowerConfig(
                    name="clipcraft/tiny-bert",
                    hf_config=copy.deepcopy(TINY_BERT),
                    tokenizer="bytes",
                    pooling="mean",
                    max_length=64,
                    normalize_features=False,
                ),
                head=HeadConfig(kind="mlp", dropout=0.0),
                embed_dim=16,
            ),
            image_pretrained=False,
            text_pretrained=False,
        ),
    ]
}


def list_presets() -> list[str]:
    """Names of the known presets, sorted."""
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (a deep copy: changing it changes nothing shared).

    Raises :class:`~clipcraft.errors.UnknownNameError` listing close and known names.
    """
    if name not in PRESETS:
        raise unknown_name("preset", name, list(PRESETS))
    return copy.deepcopy(PRESETS[name])
