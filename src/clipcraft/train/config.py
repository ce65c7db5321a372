"""The settings of a training run, and the sections shared with fine-tuning.

A job's config is a dataclass of its own fields plus three shared sections, each declared once here:
:class:`OptimConfig` (AdamW and its schedule), :class:`RunConfig` (run directory, seed, device, precision,
max_steps, logging and checkpoints) and :class:`LoaderConfig` (data loading and augmentation). A job gives
a section its own defaults (fine-tuning warms up for fewer steps than training, for instance).

Users still write flat keys (``epochs: 2`` in YAML, ``epochs=2`` on the command line,
``TrainConfig.from_dict({"epochs": 2})``): every field name is unique across a config and its sections, so
:func:`from_flat` puts each key where it belongs, and ``to_dict()`` writes the flat form back
(``config.yaml``, checkpoints). The nested form (``optim: {epochs: 2}``, ``optim.epochs=2``) is read too.

Tower locking has one owner: the training fields (``lock_image``, ``image_unlocked_groups``, ...). A
``model_overrides`` entry that sets the same model setting is refused by :func:`tower_overrides`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from clipcraft.config import TRAIN_CROP_SCALE, from_dict, load_config_file, parse_override
from clipcraft.errors import ClipcraftError
from clipcraft.precision import TRAINING_DEFAULT

C = TypeVar("C")


@dataclass
class OptimConfig:
    """AdamW and its linear warmup + cosine schedule. The learning rates belong to each job: they name its
    parts (towers, heads, classifier)."""

    epochs: int = 5
    batch_size: int = 64  # samples per optimizer step, per process
    weight_decay: float = 0.1  # not applied to 1-D parameters (norms, biases, logit scale)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    grad_clip_norm: float | None = None  # None: no clipping


@dataclass
class RunConfig:
    """Where a run writes and how it runs: the same for every job (see :mod:`clipcraft.train.run`)."""

    output_dir: str = "runs/train"  # the run directory (checkpoint, metrics, config.yaml, models)
    seed: int = 0
    device: str = "auto"  # auto (cuda:LOCAL_RANK when CUDA is available, else cpu) | cpu | cuda | cuda:N
    precision: str = TRAINING_DEFAULT  # auto (bf16 where the hardware has native bf16) | bf16 | fp32
    max_steps: int | None = None  # stop (with a checkpoint, resumable) after this many optimizer steps
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)


@dataclass
class LoaderConfig:
    """How training images are loaded and augmented, and the batch size of evaluation passes."""

    augment: bool = True  # random resized crop while training
    crop_scale: tuple[float, float] = TRAIN_CROP_SCALE  # area fraction range of the random crop
    num_workers: int = 2  # data loader processes (0: load in the training process)
    eval_batch_size: int = 64


SECTIONS: dict[str, type] = {"optim": OptimConfig, "run": RunConfig, "loader": LoaderConfig}


@dataclass
class TrainConfig:
    """One training run: ``clipcraft train --config FILE key=value ...``, or ``TrainConfig.from_dict(...)``
    with the same flat keys. Every field has a default."""

    # -- model
    model: str = "minilm-vit-tiny"  # preset name or saved model directory
    init: str | None = (
        None  # start from this existing model instead (saved directory, transformers CLIP/SigLIP
    )
    # directory, hf:ID, open_clip:ARCH,checkpoint=FILE); pretrained and image_checkpoint do not apply
    pretrained: bool | None = None  # None: the preset's default per tower
    image_checkpoint: str | None = None  # local weights file for the image tower
    model_overrides: dict[str, Any] = field(default_factory=dict)  # dotted ModelConfig keys, but not locking
    lock_image: bool = False  # LiT: freeze the image tower ...
    image_unlocked_groups: int = 0  # ... except its last N blocks
    lock_text: bool = False
    text_unlocked_groups: int = 0
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    patch_dropout: float = 0.0  # drop this fraction of each training image's patch tokens (timm ViTs, FLIP)
    channels_last: bool = False  # NHWC image tower weights and batches: faster CNN towers, same result
    # -- data
    data: str = ""  # dataset path (format detected; see clipcraft.data)
    data_format: str | None = None  # override detection: flickr | table | coco | imagefolder | webdataset
    data_options: dict[str, Any] = field(default_factory=dict)  # reader options (columns, image_root, ...)
    train_split: str = "auto"  # auto: "train" for formats with splits, else "all"
    val_data: str | None = None  # None: the validation split of `data`
    val_split: str | None = "auto"  # auto: "dev"/"validation" when the format has one; None: no validation
    hflip: float = 0.0  # horizontal flip probability while training (0: captions say "left" and "right")
    max_bad_fraction: float = 0.05  # fail before training when more of the data is bad
    # -- streaming from WebDataset shards (data: shards, brace pattern, glob, pipe:/fsspec URL, a::b sources)
    train_num_samples: int | None = None  # samples per epoch, all ranks (None: the shard manifests' total)
    resampled: bool = False  # draw shards with replacement (per rank and worker) instead of epoch order
    data_weights: list[float] | None = None  # resampled: how often each '::' source is drawn
    shuffle_buffer: int = 1000  # samples shuffled together in each loader worker
    stream_deterministic: bool = (
        False  # every rank reads all shards, keeps its slice: same data for any ranks
    )
    check_images: str = "header"  # none | header | decode: how hard to look at images before training
    # -- learning
    lr_image_tower: float = 1e-5
    lr_text_tower: float = 1e-5
    lr_heads: float = 1e-3  # heads, and (unless lr_logit_scale is set) the logit scale and bias
    lr_logit_scale: float | None = (
        None  # the temperature's own rate (no weight decay either way); None: lr_heads
    )
    learn_logit_scale: bool = True  # False: the temperature stays at the model's initial value
    label_smoothing: float = 0.0  # clip loss only: 1 - eps on the match(es), eps spread over all columns
    ema_decay: float = 0.0  # > 0: validate, save and test an exponential moving average of the weights
    # SLIP (arXiv 2112.12750): > 0 adds ssl_weight x a SimCLR (NT-Xent) loss between two random crops of each
    # training image (the image-text crop and one more: one extra image-tower pass per image; with
    # patch_dropout both crops are thinned). Negatives come from every rank under torchrun. Needs a trainable
    # image tower and augment=true; map-style data only. The projection MLP (features -> ssl_hidden ->
    # ssl_hidden -> ssl_dim; SLIP's 4096-4096-256 suits ViT-B, these defaults towers of 192-768 features) is
    # the loss's own: trained at lr_heads, kept in the checkpoint, not in the saved model (losses.SlipLoss).
    ssl_weight: float = 0.0
    ssl_temperature: float = 0.1  # NT-Xent temperature (SimCLR's and SLIP's 0.1)
    ssl_hidden: int = 512  # the SimCLR MLP's hidden width
    ssl_dim: int = 128  # its output width
    # CLIP-rocket-style caption augmentation (EDA without synonyms: word deletion, swap, insertion; see
    # clipcraft.data.text_augment). > 0: each caption gets this many fixed variants and every sample shows the
    # original or one of them, drawn per epoch from the seed. A locked, cached text tower encodes the variants
    # once (V+1 caches); otherwise the loader edits the caption before tokenizing. Map-style data only.
    text_augment_variants: int = 0
    text_augment_strength: float = 0.1  # fraction of a caption's words each variant edits, in (0, 1]
    grad_accum_steps: int = 1  # split each batch into micro-batches; the loss stays the full-batch loss
    loss: str = "clip"  # clip | siglip
    captions_per_image: int = 1  # captions of each image in every step (k > 1 needs a cached text tower)
    feature_cache: bool = True  # cache features of locked towers whose input is not augmented
    cache_dir: str | None = None  # default: <output_dir>/feature-cache
    example_sheet: bool = True  # PNG of a few captions with their top-5 images at the end
    # -- shared sections
    optim: OptimConfig = field(default_factory=OptimConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def learning_rates(self) -> dict[str, float]:
        """The rate of each part :func:`clipcraft.train.optim.param_groups` knows."""
        return {
            "image_tower": self.lr_image_tower,
            "text_tower": self.lr_text_tower,
            "heads": self.lr_heads,
            "logit": self.lr_heads if self.lr_logit_scale is None else self.lr_logit_scale,
        }

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping users write (what ``config.yaml`` and checkpoints hold)."""
        return to_flat(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return from_flat(cls, data)


def to_flat(config: Any) -> dict[str, Any]:
    """A config with sections as one flat mapping: the job's own fields, then each section's."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in SECTIONS:
            out.update(dataclasses.asdict(value))
        else:
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def flat_keys(cls: type) -> dict[str, str | None]:
    """Every key a config class reads -> the section holding it (None: the class's own field)."""
    keys: dict[str, str | None] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in SECTIONS:
            keys.update({g.name: f.name for g in dataclasses.fields(SECTIONS[f.name])})
        else:
            keys[f.name] = None
    return keys


def from_flat(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build ``cls`` from flat keys (``epochs``), dotted section keys (``optim.epochs``) or whole sections
    (``optim: {epochs: 2}``). Section fields not given keep the defaults ``cls`` gives them; an unknown key
    is a :class:`ClipcraftError` that lists the known ones."""
    if not isinstance(data, Mapping):
        raise ClipcraftError(f"A {cls.__name__} must be a mapping of config keys, got {data!r}.")
    keys = flat_keys(cls)
    sections = [f.name for f in dataclasses.fields(cls) if f.name in SECTIONS]  # type: ignore[arg-type]
    own: dict[str, Any] = {}
    given: dict[str, dict[str, Any]] = {name: {} for name in sections}
    unknown = []
    for key, value in data.items():
        head, dot, rest = key.partition(".")
        if key in sections and isinstance(value, Mapping):
            given[key].update(value)
        elif dot and head in sections:
            given[head][rest] = value
        elif key not in keys:
            unknown.append(key)
        elif keys[key] is None:
            own[key] = value
        else:
            given[keys[key]][key] = value  # type: ignore[index]
    if unknown:
        raise ClipcraftError(
            f"Unknown config key(s) {sorted(unknown)} in {cls.__name__}; known: {sorted(keys)}."
        )
    defaults = cls()
    for name in sections:
        section = {**dataclasses.asdict(getattr(defaults, name)), **given[name]}
        own[name] = from_dict(SECTIONS[name], section, name)
    return from_dict(cls, own)  # sections are built already: from_dict passes them through


# -- tower locking: one owner ---------------------------------------------------------------------------------

# ModelConfig settings that the training fields own, and the field that sets each.
TOWER_FIELDS = {
    "image.lock": "lock_image",
    "image.unlocked_groups": "image_unlocked_groups",
    "text.lock": "lock_text",
    "text.unlocked_groups": "text_unlocked_groups",
    "image.grad_checkpointing": "grad_checkpointing",
    "text.grad_checkpointing": "grad_checkpointing",
}


def tower_overrides(model_overrides: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """``model_overrides`` plus the model settings of the job's tower fields (``lock_image=True`` ->
    ``{"image.lock": True}``; only the fields given).

    Raises :class:`ClipcraftError` when ``model_overrides`` sets one of those settings itself (dotted, or
    inside an ``image``/``text`` mapping): the field is the one way to set it, so the two cannot disagree.
    """
    overrides = dict(model_overrides or {})
    for key, value in overrides.items():
        dotted = (
            [f"{key}.{k}" for k in value]
            if key in ("image", "text") and isinstance(value, Mapping)
            else [key]
        )
        for name in dotted:
            if name in TOWER_FIELDS:
                raise ClipcraftError(
                    f"model_overrides sets {name!r}, which the training field {TOWER_FIELDS[name]} owns; "
                    f"remove it from model_overrides and set {TOWER_FIELDS[name]}=... instead."
                )
    unknown = sorted(set(fields) - set(TOWER_FIELDS.values()))
    if unknown:
        raise ClipcraftError(f"Not tower fields: {unknown}; known: {sorted(set(TOWER_FIELDS.values()))}.")
    overrides.update({key: fields[name] for key, name in TOWER_FIELDS.items() if name in fields})
    return overrides


# -- the command line -----------------------------------------------------------------------------------------

PRECISION_HELP = (
    "auto | fp32 | bf16 (default auto). auto: bf16 where the hardware has native bf16 (CUDA, or CPUs with "
    "AVX512-BF16/AMX), else fp32. The precision that ran is recorded in config.yaml, the checkpoint and "
    "summary.json"
)
DEVICE_HELP = "auto | cpu | cuda | cuda:N (default auto: cuda when available, else cpu)"


def add_runtime_flags(parser: Any) -> None:
    """``--output-dir``, ``--device`` and ``--precision``: the flags every training job takes alike."""
    parser.add_argument(
        "--output-dir", default=None, help="run directory: checkpoint, metrics, config.yaml, models"
    )
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None, help=PRECISION_HELP)


# -- where a command's config comes from ---------------------------------------------------------------------

# Config fields holding a mapping: a `field.key=value` override sets one entry in them.
MAPPING_FIELDS = ("model_overrides", "data_options")


def gather_config(
    resume: str | Path | None,
    config_file: str | Path | None,
    flags: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The config mapping a command runs with, from its sources in increasing precedence: the config saved in
    the checkpoint of the run being resumed, a YAML/JSON file, command-line flags (None values are left
    out) and ``key=value`` overrides; ``model_overrides.KEY=value`` and ``data_options.KEY=value`` set one
    entry of those mappings and keep the rest."""
    data: dict[str, Any] = {}
    if resume is not None:
        from clipcraft.train.checkpoint import load_checkpoint

        data.update(load_checkpoint(resume)["config"])
    if config_file is not None:
        data.update(load_config_file(config_file))
    data.update({key: value for key, value in flags.items() if value is not None})
    for item in overrides:
        key, value = parse_override(item)
        head, dot, rest = key.partition(".")
        if dot and head in MAPPING_FIELDS:  # model_overrides.embed_dim=512: one entry, the others kept
            data[head] = {**(data.get(head) or {}), rest: value}
        else:
            data[key] = value
    return data
