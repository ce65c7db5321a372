"""The settings of one fine-tuning run, as a dataclass with a default for every field.

``clipcraft finetune`` fills one from flags, an optional YAML/JSON file and ``key=value`` overrides; the
resolved config is written to ``config.yaml`` in the output directory and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from clipcraft.config import TrainConfig, from_dict
from clipcraft.errors import ClipcraftError

# Mixing coefficients tried by weight-space ensembling: 0 is the zero-shot model, 1 the fine-tuned one.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Every field has a default; the data and model paths must be given."""

    # -- model and data
    model: str = ""  # saved clipcraft model directory to start from
    train: str = ""  # folder with one subfolder of images per class
    val: str | None = None  # class folder for validation; None: carve val_fraction out of `train`
    test: str | None = None  # class folder scored once at the end; None: no test split
    output_dir: str = "runs/finetune"  # run directory, and the fine-tuned model directory at the end
    classnames_file: str | None = None  # folder<TAB>readable name per line; None: folder names, _ -> space
    templates_file: str | None = None  # prompt templates for the zero-shot head; None: the built-in set
    val_fraction: float = 0.1  # share of every training class held out when `val` is None
    limit_per_class: int | None = None  # use the first N images (by file name) of each class in every split
    augment: bool = True  # random resized crop + colour jitter on training images
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area fraction range of the random crop
    num_workers: int = 0  # data loader processes (0: load in the training process)
    lock_image: bool = False  # freeze the image tower: train its projection head and the classifier only
    # -- optimisation
    epochs: int = 10
    max_steps: int | None = None  # stop (with a checkpoint, resumable) after this many optimizer steps
    batch_size: int = 32
    lr_tower: float = 1e-5  # image tower and its projection head: the pretrained encoder moves slowly
    lr_head: float = 1e-3  # classifier head (starts at the zero-shot text embeddings)
    weight_decay: float = 0.1  # not applied to 1-D parameters (norms, biases)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 50  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = 1.0  # None: no clipping
    patience: int = 3  # stop after this many epochs without a better val top-1 (0: never stop early)
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp32
    # -- weight-space ensembling
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # each in [0, 1]; the best on val is saved
    # -- run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    eval_batch_size: int = 64
    overwrite: bool = False  # allow an output_dir that already holds a run or a model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return from_dict(cls, data)

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
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ClipcraftError(f"{name} must be >= 1; got {getattr(self, name)}.")
        for name, value in (("lr_tower", self.lr_tower), ("lr_head", self.lr_head)):
            if not (math.isfinite(value) and value >= 0):
                raise ClipcraftError(f"{name} must be a finite number >= 0; got {value}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ClipcraftError(f"max_steps must be >= 1 or null; got {self.max_steps}.")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise ClipcraftError(f"limit_per_class must be >= 1 or null; got {self.limit_per_class}.")
        for name in ("patience", "warmup_steps", "checkpoint_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ClipcraftError(f"{name} must be >= 0; got {getattr(self, name)}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ClipcraftError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}.")

    def optim_config(self) -> TrainConfig:
        """The optimizer and schedule fields in the shape :mod:`clipcraft.train.optim` reads, so fine-tuning
        uses the training loop's AdamW parameter groups and warmup + cosine schedule."""
        return TrainConfig(
            lr_image_tower=self.lr_tower,
            lr_heads=self.lr_head,
            weight_decay=self.weight_decay,
            betas=tuple(self.betas),  # type: ignore[arg-type]
            eps=self.eps,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
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
