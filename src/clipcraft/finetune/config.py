"""The settings of one fine-tuning run, as a dataclass with a default for every field.

``clipcraft finetune`` fills one from flags, an optional YAML/JSON file and ``key=value`` overrides; the
resolved config is written to ``config.yaml`` in the output directory and stored in every checkpoint. The
optimiser, run and loader sections are the training job's (:mod:`clipcraft.train.config`), with
fine-tuning's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clipcraft.errors import ClipcraftError
from clipcraft.train.config import LoaderConfig, OptimConfig, RunConfig, from_flat, to_flat

# Mixing coefficients tried by weight-space ensembling: 0 is the zero-shot model, 1 the fine-tuned one.
METHODS = ("ce", "flyp")
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Every field has a default; the data and model paths must be given. Build one
    from flat keys with :meth:`from_dict` (``{"model": ..., "epochs": 3}``): the shared sections are filled
    from their fields' names, as in :class:`~clipcraft.train.config.TrainConfig`."""

    # -- model and data
    model: str = ""  # saved clipcraft model directory to start from
    train: str = ""  # folder with one subfolder of images per class
    val: str | None = None  # class folder for validation; None: carve val_fraction out of `train`
    test: str | None = None  # class folder scored once at the end; None: no test split
    classnames_file: str | None = None  # folder<TAB>readable name per line; None: folder names, _ -> space
    templates_file: str | None = None  # prompt templates for the zero-shot head; None: the built-in set
    val_fraction: float = 0.1  # share of every training class held out when `val` is None
    limit_per_class: int | None = None  # use the first N images (by file name) of each class in every split
    lock_image: bool = False  # freeze the image tower: train its projection head and the classifier only
    # -- learning
    lr_tower: float = 1e-5  # image tower and its projection head: the pretrained encoder moves slowly
    lr_head: float = 1e-3  # classifier head (starts at the zero-shot text embeddings)
    label_smoothing: float = 0.0
    patience: int = 3  # stop after this many epochs without a better val top-1 (0: never stop early)
    # -- adaptation
    method: str = "ce"  # ce: cross-entropy on a classifier head started at zero-shot | flyp: contrastive
    # fine-tuning with class prompts as captions (the classifier is the text tower's class embeddings)
    lr_text: float = 1e-5  # flyp: the text tower, its head and the temperature
    layer_decay: float = 1.0  # block i of n in an unlocked tower trains at lr * layer_decay**(n - i); 1: off
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank instead of the towers' weights (needs peft)
    lora_alpha: float = 16.0  # LoRA scaling: the update is (lora_alpha / lora_rank) * B A
    lora_dropout: float = 0.0
    lora_towers: str = "image"  # image | text | both (text and both need method flyp)
    lora_targets: tuple[str, ...] | None = (
        None  # Linear module-name suffixes; None: attention + MLP of the kind
    )
    retention: str | None = None  # a second data set: class folders (zero-shot top-1) or image-caption data
    # (retrieval mean recall), scored for the initial, fine-tuned and chosen models
    retention_split: str | None = "test"  # split of `retention` (Flickr: test = the standard 1,000 images)
    retention_limit: int | None = None  # images per class (folders) or images (captions); None: all
    retention_val_split: str | None = (
        "dev"  # split of `retention` that wise_keep chooses alpha on (Flickr: dev)
    )
    # -- weight-space ensembling
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # each in [0, 1]; the best on val is saved
    wise_keep: float | None = None  # with retention: the best val top-1 among the mixtures that keep at least
    # this share of the initial model's retention on retention_val_split (e.g. 0.9); None: val top-1 alone
    overwrite: bool = False  # allow an output_dir that already holds a run or a model
    # -- shared sections, with fine-tuning's defaults
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            epochs=10,
            batch_size=32,
            betas=(0.9, 0.999),
            eps=1e-8,
            warmup_steps=50,
            grad_clip_norm=1.0,
        )
    )
    loader: LoaderConfig = field(
        default_factory=lambda: LoaderConfig(crop_scale=(0.5, 1.0), num_workers=0)  # + colour jitter
    )
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/finetune"))

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping users write (what ``config.yaml`` and checkpoints hold)."""
        return to_flat(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneConfig:
        return from_flat(cls, data)

    def check(self) -> None:
        """Raise :class:`ClipcraftError` naming the first field that cannot work; reads no files."""
        if not self.model:
            raise ClipcraftError("Give the model to fine-tune: --model MODEL_DIR (a saved clipcraft model).")
        if not self.train:
            raise ClipcraftError("Give the training images: --train DIR with one subfolder per class.")
        check_alphas(self.alphas)
        if self.val is None and not 0.0 < self.val_fraction < 1.0:
            raise ClipcraftError(
                f"val_fraction must be in (0, 1) when no --val is given; got {self.val_fraction}."
            )
        values = {**to_flat(self)}
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if values[name] < 1:
                raise ClipcraftError(f"{name} must be >= 1; got {values[name]}.")
        for name, value in (("lr_tower", self.lr_tower), ("lr_head", self.lr_head)):
            if not (math.isfinite(value) and value >= 0):
                raise ClipcraftError(f"{name} must be a finite number >= 0; got {value}.")
        if self.run.max_steps is not None and self.run.max_steps < 1:
            raise ClipcraftError(f"max_steps must be >= 1 or null; got {self.run.max_steps}.")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise ClipcraftError(f"limit_per_class must be >= 1 or null; got {self.limit_per_class}.")
        for name in ("patience", "warmup_steps", "checkpoint_every", "num_workers"):
            if values[name] < 0:
                raise ClipcraftError(f"{name} must be >= 0; got {values[name]}.")
        if self.method not in METHODS:
            raise ClipcraftError(f"method must be one of {METHODS}; got {self.method!r}.")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ClipcraftError(f"layer_decay must be in (0, 1]; got {self.layer_decay}.")
        if self.lora_rank < 0:
            raise ClipcraftError(f"lora_rank must be >= 0 (0: no LoRA); got {self.lora_rank}.")
        if self.lora_rank and self.lora_towers not in ("image", "text", "both"):
            raise ClipcraftError(f"lora_towers must be image, text or both; got {self.lora_towers!r}.")
        if self.lora_rank and self.lora_towers != "image" and self.method != "flyp":
            raise ClipcraftError(
                "LoRA on the text tower needs method=flyp: the cross-entropy fine-tune never trains the text side."
            )
        if self.lora_rank and self.lock_image and self.lora_towers != "text":
            raise ClipcraftError("lock_image freezes the image tower; LoRA adapters on it would never train.")
        if not (math.isfinite(self.lr_text) and self.lr_text >= 0):
            raise ClipcraftError(f"lr_text must be a finite number >= 0; got {self.lr_text}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ClipcraftError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}.")
        if self.wise_keep is not None:
            self._check_wise_keep()

    def _check_wise_keep(self) -> None:
        if not (math.isfinite(self.wise_keep) and 0.0 < self.wise_keep <= 1.0):
            raise ClipcraftError(f"wise_keep must be in (0, 1] or null; got {self.wise_keep}.")
        if not self.retention:
            raise ClipcraftError(
                "wise_keep needs retention=DATA: the data set whose score the mixtures must keep."
            )
        if self.retention_val_split == self.retention_split:
            raise ClipcraftError(
                f"wise_keep chooses alpha on retention_val_split={self.retention_val_split!r}, the split the run "
                "reports retention on; give a separate validation split (Flickr: dev) so the reported figure is "
                "not the one the choice was made on."
            )
        if 0.0 not in check_alphas(self.alphas):
            raise ClipcraftError(
                "wise_keep needs alpha 0 (the initial model, which keeps all of its retention) among --alphas."
            )


def check_alphas(alphas: Any) -> list[float]:
    """The mixing coefficients as sorted, distinct floats; raises :class:`ClipcraftError` for an empty list or
    a value outside [0, 1] (0 = zero-shot weights, 1 = fine-tuned weights)."""
    try:
        values = [float(a) for a in alphas]
    except (TypeError, ValueError) as exc:
        raise ClipcraftError(f"alphas must be numbers in [0, 1]; got {alphas!r}.") from exc
    if not values:
        raise ClipcraftError("alphas is empty; give at least one mixing coefficient in [0, 1].")
    bad = [a for a in values if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
    if bad:
        raise ClipcraftError(
            f"alpha {bad[0]} is outside [0, 1]: weight-space ensembling mixes (1 - alpha) * zero-shot + "
            "alpha * fine-tuned weights, so alpha = 0 is the zero-shot model and alpha = 1 the fine-tuned one."
        )
    return sorted(set(values))
