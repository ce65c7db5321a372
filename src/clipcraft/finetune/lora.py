"""LoRA adapters on either or both towers, through ``peft``: add, save, load, merge.

``W x`` becomes ``W x + (alpha / rank) * B A x`` in the targeted linear layers, with ``A`` (rank, in) random
and ``B`` (out, rank) zero at the start, so the adapted model begins as the original one. Only ``A``, ``B``
(and whatever else the job leaves trainable: the heads) train; the tower's own weights are frozen.

Adapters are saved apart from the model (``adapters/adapter_model.safetensors`` + ``adapter_config.json``:
the LoRA settings and which towers) and can be merged into plain weights (:func:`merge_lora`), after which
the model is an ordinary :class:`~clipcraft.model.ClipModel` with no peft layers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipcraft.errors import CheckpointError, ClipcraftError

ADAPTER_DIR = "adapters"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORA_TOWERS = ("image", "text", "both")
_TOWER_ATTR = {"image": "image_tower", "text": "text_tower"}
# Linear layers adapted by default, by tower implementation (attention and MLP projections)
DEFAULT_TARGETS = {
    "timm": ("qkv", "attn.proj", "fc1", "fc2"),
    "hf_clip": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "hf_siglip": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "hf": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
}


@dataclass
class LoraSettings:
    """What :func:`add_lora` adds: rank, scaling alpha, dropout, towers and target module name suffixes."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    towers: str = "image"  # image | text | both
    targets: tuple[str, ...] | None = None  # module-name suffixes; None: DEFAULT_TARGETS of each tower's kind

    def tower_names(self) -> list[str]:
        if self.towers not in LORA_TOWERS:
            raise ClipcraftError(f"lora_towers must be one of {LORA_TOWERS}; got {self.towers!r}.")
        return ["image", "text"] if self.towers == "both" else [self.towers]


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ClipcraftError(
            "LoRA adapters need peft: pip install peft (or: pip install 'clipcraft[adapt]')."
        ) from exc
    return peft


def _targets(model: Any, tower: str, settings: LoraSettings) -> list[str]:
    """Full names (inside the tower's inner module) of the Linear layers matching the target suffixes."""
    kind = getattr(model.config, tower).kind
    suffixes = settings.targets or DEFAULT_TARGETS[kind]
    inner = _inner(model, tower)
    names = [
        name
        for name, module in inner.named_modules()
        if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)
    ]
    if not names:
        raise ClipcraftError(
            f"No linear layer of the {tower} tower ({kind}) matches LoRA targets {list(suffixes)}; set "
            "lora_targets to suffixes of its module names."
        )
    return names


def _inner(model: Any, tower: str) -> nn.Module:
    tower_module = getattr(model, _TOWER_ATTR[tower])
    return tower_module.trunk if tower == "image" else tower_module.model


def add_lora(model: Any, settings: LoraSettings) -> int:
    """Inject LoRA layers into ``settings.towers`` of ``model`` in place; freeze those towers' own weights.

    Returns the number of trainable LoRA parameters. Raises :class:`ClipcraftError` for a rank < 1 or
    targets that match nothing.
    """
    peft = _peft()
    if settings.rank < 1:
        raise ClipcraftError(f"lora_rank must be >= 1; got {settings.rank}.")
    count = 0
    for tower in settings.tower_names():
        inner = _inner(model, tower)
        config = peft.LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=_targets(model, tower, settings),
            bias="none",
        )
        peft.inject_adapter_in_model(config, inner)
        for name, param in inner.named_parameters():
            is_lora = "lora_" in name
            param.requires_grad_(is_lora)
            count += param.numel() if is_lora else 0
    return count


def lora_state(model: Any) -> dict[str, Tensor]:
    """The LoRA parameters of ``model`` by their full state-dict names (live tensors)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def save_adapters(model: Any, path: str | Path, settings: LoraSettings) -> Path:
    """Write ``path/adapter_model.safetensors`` (the LoRA weights, plus the other weights that trained beside
    them: heads, temperature; peft's "modules to save") and ``adapter_config.json``."""
    from safetensors.torch import save_file

    from clipcraft.files import atomic_dir

    state = {k: v.detach().cpu().contiguous() for k, v in lora_state(model).items()}
    if not state:
        raise ClipcraftError("The model has no LoRA adapters to save.")
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    state.update({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in trained})
    with atomic_dir(Path(path)) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "clipcraft-lora"})
        meta = {"format": "clipcraft-lora", **asdict(settings), "peft_type": "LORA"}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)


def load_adapters(model: Any, path: str | Path) -> LoraSettings:
    """Add the adapters saved at ``path`` to ``model`` (the model they were trained on) and load their
    weights; raises :class:`CheckpointError` when they do not fit."""
    from safetensors.torch import load_file

    meta = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    settings = LoraSettings(
        rank=int(meta["rank"]),
        alpha=float(meta["alpha"]),
        dropout=float(meta["dropout"]),
        towers=str(meta["towers"]),
        targets=tuple(meta["targets"]) if meta.get("targets") else None,
    )
    add_lora(model, settings)
    saved = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    live = model.state_dict()
    lora_keys = set(lora_state(model))
    wrong = sorted((lora_keys - set(saved)) | (set(saved) - set(live)))
    wrong += [k for k in saved if k in live and tuple(live[k].shape) != tuple(saved[k].shape)]
    if wrong:
        raise CheckpointError(
            f"Adapters at {path} do not fit this model: {len(wrong)} keys, e.g. {wrong[:4]}."
        )
    with torch.no_grad():
        for key, value in saved.items():
            live[key].copy_(value)
    return settings


def merge_lora(model: Any) -> Any:
    """Fold every LoRA layer of ``model`` into its base Linear (``W + scale * B A``) and put the plain Linear
    back in its place; returns ``model``, now free of peft layers (its state dict is the plain model's)."""
    from peft.tuners.lora import LoraLayer

    for tower in ("image", "text"):
        inner = _inner(model, tower)
        for name, module in list(inner.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = inner.get_submodule(parent_name) if parent_name else inner
                setattr(parent, child, module.get_base_layer())
    for name, param in model.named_parameters():
        if "lora_" in name:
            raise ClipcraftError(f"LoRA parameter {name} survived the merge.")
        del param
    return model


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())
