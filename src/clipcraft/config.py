"""Model configuration as plain dataclasses, with JSON/YAML in and out.

A :class:`ModelConfig` fully describes a model: which towers, how they are built, how their inputs are
preprocessed, and the heads on top. It is written next to every saved model (``config.json``) so a model
reloads exactly as it was trained, with no network. Also here: the generic helpers every job's config uses
(:func:`from_dict`, :func:`apply_overrides`, :func:`load_config_file`, :func:`parse_override`). Job configs
live with their jobs (:mod:`clipcraft.train.config`, :mod:`clipcraft.finetune.config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from clipcraft.errors import ClipcraftError

T = TypeVar("T")


# Area fraction range of the training random crop: captions describe the whole picture, so crops stay large.
TRAIN_CROP_SCALE = (0.9, 1.0)


@dataclass
class PreprocessConfig:
    """How raw images become the image tower's input (resolved from the timm checkpoint's data config)."""

    input_size: tuple[int, int, int] = (3, 224, 224)  # (C, H, W) fed to the tower
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation of [0, 1] pixels
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"  # resize filter
    crop_pct: float = 0.9  # eval: resize to size / crop_pct, then centre crop to size
    crop_mode: str = "center"


@dataclass
class ImageTowerConfig:
    """The image tower: a timm model used as a feature extractor (``num_classes=0``: pooled pre-logits
    features), or a transformers CLIP / SigLIP vision model (its own pooler output)."""

    kind: str = "timm"  # timm | hf_clip (CLIPVisionModel) | hf_siglip (SiglipVisionModel)
    name: str = "vit_base_patch16_224.augreg2_in21k_ft_in1k"  # timm model name (optionally with a tag), or
    # for hf kinds the source it came from (hub id or directory; used only when pretrained weights are asked)
    hf_config: dict[str, Any] | None = None  # hf kinds: the vision config (builds the tower without files)
    checkpoint: str | None = None  # local weights file used when pretrained weights are asked for
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm create_model kwargs
    preprocess: PreprocessConfig | None = None  # None: resolved from timm's data config at build time
    lock: bool = False  # LiT: freeze the tower
    unlocked_groups: int = 0  # with lock: leave the last N blocks (and what follows them) trainable
    grad_checkpointing: bool = False  # trade compute for activation memory while training


@dataclass
class TextTowerConfig:
    """A Hugging Face transformer plus pooling, with its tokenizer.

    ``kind="hf"``: any transformers encoder (AutoModel) pooled by clipcraft (mean, cls or max).
    ``kind="hf_clip"`` / ``"hf_siglip"``: a ``CLIPTextModel`` / ``SiglipTextModel`` whose own pooler output
    (CLIP: the end-of-text token; SigLIP: the last position, through its linear head) is the feature.
    """

    kind: str = "hf"  # hf | hf_clip | hf_siglip
    name: str = "sentence-transformers/all-mpnet-base-v2"  # hub id or local directory
    hf_config: dict[str, Any] | None = None  # architecture, to build without files; None: read from source
    tokenizer: str | None = None  # tokenizer source: None = same as name; "bytes" = built-in byte tokenizer
    pooling: str | None = None  # mean | cls | max | pooler (the model's pooling layer) (kind hf; None: from a
    # sentence-transformers dir, else mean); eos (hf_clip) | last (hf_siglip): set by the tower kind
    padding: str = "longest"  # longest | max_length (SigLIP was trained on captions padded to max_length)
    max_length: int | None = None  # tokens per caption (longer ones are truncated); None: from source
    normalize_features: bool | None = None  # L2-normalise pooled features (sentence-transformers Normalize)
    lowercase: bool | None = (
        None  # lowercase captions before tokenizing (sentence-transformers do_lower_case)
    )
    lock: bool = False  # LiT: freeze the tower
    unlocked_groups: int = 0  # with lock: leave the last N layers (and what follows them) trainable
    grad_checkpointing: bool = False


@dataclass
class HeadConfig:
    """Projection heads from each tower's features into the shared embedding space."""

    kind: str = "mlp"  # linear (as CLIP) | mlp (Linear -> GELU -> Linear, dropout, residual, LayerNorm) |
    # plain_mlp (bias-free Linear -> GELU -> Linear, as open_clip projects a transformers text tower) |
    # none (identity: the tower's features are the embeddings, as SigLIP; needs features of embed_dim)
    dropout: float = 0.1  # mlp only
    text_kind: str | None = None  # the text head's kind where it differs from the image head's (None: kind)

    def kind_of(self, tower: str) -> str:
        """The head kind of ``tower`` ("image" or "text")."""
        return (self.text_kind or self.kind) if tower == "text" else self.kind


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model: towers, heads, shared dimension and temperature."""

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    embed_dim: int = 512  # shared embedding dimension
    init_logit_scale: float = math.log(1 / 0.07)  # log of the inverse temperature (CLIP's init)
    max_logit_scale: float = math.log(100.0)  # clamp after every optimizer step
    init_logit_bias: float = -10.0  # learnable bias for the sigmoid (SigLIP) loss
    source: dict[str, Any] | None = None  # where an imported model came from (format, name, checkpoint)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by name.

    Nested dataclass fields are built recursively; tuples are restored from JSON lists.
    """
    if not isinstance(data, dict):
        raise ClipcraftError(f"Config section {where or cls.__name__!r} must be a mapping, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ClipcraftError(
            f"Unknown config key(s) {unknown} in {where or cls.__name__}; known: {sorted(fields)}."
        )
    hints = _resolved_types(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        target = hints.get(name)
        sub = _dataclass_in(target)
        if sub is not None and isinstance(value, dict):
            kwargs[name] = from_dict(sub, value, f"{where}.{name}" if where else name)
        elif isinstance(value, list) and "tuple" in str(target):
            kwargs[name] = tuple(value)
        elif isinstance(value, str) and _is_float_field(target):
            kwargs[name] = _float_from_text(value, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _is_float_field(annotation: Any) -> bool:
    """``float`` or ``float | None``."""
    import typing

    return annotation is float or (
        float in typing.get_args(annotation) and str not in typing.get_args(annotation)
    )


def _float_from_text(value: str, key: str) -> float:
    """A number field given as text: YAML 1.1 (PyYAML) reads ``1e-5`` and ``3E4`` as strings, since it wants a
    dot in the mantissa, so ``lr=1e-5`` on the command line or in a config file arrives here as ``"1e-5"``."""
    try:
        return float(value)
    except ValueError:
        raise ClipcraftError(f"Config key {key!r} must be a number, got {value!r}.") from None


def _resolved_types(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass inside ``X`` or ``X | None``, if any."""
    import typing

    if dataclasses.is_dataclass(annotation):
        return annotation  # type: ignore[return-value]
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def apply_overrides(config: T, overrides: dict[str, Any]) -> T:
    """Return a copy of dataclass ``config`` with dotted-key overrides applied (``{"image.lock": True}``)."""
    data = dataclasses.asdict(config)  # type: ignore[call-overload]
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    raise ClipcraftError(f"Cannot set {key!r}: {part!r} is not a config section.")
            node = node[part]
        node[parts[-1]] = value
    return from_dict(type(config), data)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping from ``path`` (by extension; YAML also reads JSON)."""
    p = Path(path)
    if not p.is_file():
        raise ClipcraftError(f"Config file not found: {p}")
    text = p.read_text()
    if p.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ClipcraftError(f"{p} must hold a mapping of config keys, got {type(data).__name__}.")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as YAML (numbers, booleans, lists, null)."""
    import yaml

    if "=" not in item:
        raise ClipcraftError(f"Override {item!r} is not key=value.")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().replace("-", "_"), value
