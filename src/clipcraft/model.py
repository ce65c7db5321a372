"""The CLIP model: two towers, two projection heads and a learnable temperature.

Vocabulary used throughout: *features* are what a tower outputs; *embeddings* are features projected by a
head and L2-normalised; *logits* are embeddings' cosine similarities times the logit scale.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clipcraft.config import ModelConfig
from clipcraft.errors import CheckpointError, ClipcraftError, PretrainedWeightsError
from clipcraft.files import atomic_dir
from clipcraft.heads import build_head
from clipcraft.images import ImageInput
from clipcraft.precision import INFERENCE_DEFAULT, Precision, autocast, resolve_precision
from clipcraft.towers import ImageTower, TextTower, load_tokenizer
from clipcraft.version import __version__

FORMAT_NAME = "clipcraft"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


@dataclass
class ClipOutput:
    """What :meth:`ClipModel.forward` returns. Either side is ``None`` when its input was not given.

    image_embeddings: (B, D) float, L2-normalised.
    text_embeddings: (B, D) float, L2-normalised.
    logit_scale: scalar tensor, the multiplier exp(log scale) (not its log).
    logit_bias: scalar tensor, the sigmoid loss's bias.
    image_features: (B, F_img) the image tower's pooled features the image embeddings were projected from
        (the cached features when those were given), for losses with a head of their own (SLIP's
        self-supervision, :class:`~clipcraft.losses.SlipLoss`); ``None`` without images.
    """

    image_embeddings: Tensor | None
    text_embeddings: Tensor | None
    logit_scale: Tensor
    logit_bias: Tensor
    image_features: Tensor | None = None

    def logits_per_image(self) -> Tensor:
        """(B_img, B_txt) scaled similarities."""
        assert self.image_embeddings is not None and self.text_embeddings is not None
        return self.logit_scale * self.image_embeddings @ self.text_embeddings.T


class ClipModel(nn.Module):
    """Image tower + text tower, each followed by a projection head into a shared ``embed_dim`` space.

    Build one with :func:`clipcraft.create_model` or :func:`clipcraft.load`; the config it was built from,
    completed with the resolved preprocessing and text settings, is ``model.config``.
    """

    def __init__(
        self, config: ModelConfig, image_pretrained: bool = False, text_pretrained: bool = False
    ) -> None:
        super().__init__()
        config = copy.deepcopy(config)
        self.image_tower = ImageTower(config.image, pretrained=image_pretrained)
        self.text_tower = TextTower(config.text, pretrained=text_pretrained)
        self.image_head = build_head(config.head, self.image_tower.num_features, config.embed_dim, "image")
        self.text_head = build_head(config.head, self.text_tower.num_features, config.embed_dim, "text")
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))  # log of the multiplier
        self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        self.config = config

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def tokenizer(self) -> Any:
        return self.text_tower.tokenizer

    def image_transform(
        self, train: bool = False, scale: tuple[float, float] | None = None, hflip: float = 0.0
    ) -> Any:
        """PIL image -> (3, H, W) tensor, from the image tower's data config (see :meth:`ImageTower.transform`)."""
        return self.image_tower.transform(train, scale=scale, hflip=hflip)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Captions -> ``{"input_ids", "attention_mask"}`` (B, L), truncated to the tower's max length."""
        return self.text_tower.tokenize(texts)

    # -- forward --------------------------------------------------------------------------------------------

    def embed_image_features(self, features: Tensor) -> Tensor:
        """(B, F_img) image tower features -> (B, D) normalised embeddings."""
        return nn.functional.normalize(self.image_head(features), dim=-1)

    def embed_text_features(self, features: Tensor) -> Tensor:
        """(B, F_txt) text tower features -> (B, D) normalised embeddings."""
        return nn.functional.normalize(self.text_head(features), dim=-1)

    def forward(
        self,
        images: Tensor | None = None,
        texts: Mapping[str, Tensor] | None = None,
        *,
        image_features: Tensor | None = None,
        text_features: Tensor | None = None,
    ) -> ClipOutput:
        """Embed a batch.

        Args:
            images: (B, 3, H, W) preprocessed pixels (see :meth:`image_transform`).
            texts: tokenizer output with ``input_ids`` and ``attention_mask`` (B, L) (see :meth:`tokenize`).
            image_features / text_features: precomputed tower features (B, F), used instead of running a
                tower (the feature cache of a locked tower).
        """
        if images is not None and image_features is not None:
            raise ClipcraftError("Pass images or image_features, not both.")
        if texts is not None and text_features is not None:
            raise ClipcraftError("Pass texts or text_features, not both.")
        if images is not None:
            image_features = self.image_tower(images)
        if texts is not None:
            text_features = self.text_tower(texts["input_ids"], texts["attention_mask"])
        return ClipOutput(
            image_embeddings=None if image_features is None else self.embed_image_features(image_features),
            text_embeddings=None if text_features is None else self.embed_text_features(text_features),
            logit_scale=self.logit_scale.exp(),
            logit_bias=self.logit_bias,
            image_features=image_features,
        )

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the log logit scale in [0, max_logit_scale]; call after every optimizer step."""
        self.logit_scale.clamp_(0.0, self.config.max_logit_scale)

    # -- encode: the inference API --------------------------------------------------------------------------

    def encode_images(
        self,
        images: Sequence[ImageInput] | ImageInput,
        batch_size: int = 32,
        normalize: bool = True,
        project: bool = True,
        precision: str | Precision = INFERENCE_DEFAULT,
        progress: bool = False,
    ) -> np.ndarray:
        """Embed images, in input order, batched, without gradients (through :mod:`clipcraft.encoding`).

        Args:
            images: file paths, PIL images (any mode: grayscale, RGBA, 16-bit are converted to RGB), (3, H, W)
                preprocessed pixel tensors, or a folder (its image files, sorted).
            project: False returns the image tower's pooled features (N, F) instead of embeddings (N, D).
            normalize: L2-normalise each row of the features (embeddings are always unit-norm).
            precision: "fp32" (default: the same numbers on every machine), "bf16", or "auto" (bf16 where the
                hardware has native bf16); the output is float32 either way.

        Returns: float32 array (N, D), or (N, F) with ``project=False``; (0, D) for an empty list.
        Raises :class:`~clipcraft.errors.ImageLoadError` naming the file that is missing or not an image.
        """
        from clipcraft.encoding import EncodeSettings, encode_images

        settings = EncodeSettings(
            output="embeddings" if project else "features",
            precision=resolve_precision(precision, self.device),
            batch_size=batch_size,
            progress=progress,
        )
        vectors = encode_images(self, images, settings).check_all().vectors
        return _normalized(vectors) if normalize and not project else vectors

    def encode_texts(
        self,
        texts: Sequence[str] | str,
        batch_size: int = 64,
        normalize: bool = True,
        project: bool = True,
        precision: str | Precision = INFERENCE_DEFAULT,
        progress: bool = False,
    ) -> np.ndarray:
        """Embed captions, in input order, batched, without gradients (through :mod:`clipcraft.encoding`).

        Captions longer than the tower's ``max_length`` tokens are truncated. A single string is treated as
        a list of one. Other arguments and the return value as for :meth:`encode_images`. Batches are formed
        from captions of similar length (longest first), so little time goes into padding; the rows come back
        in input order.
        """
        from clipcraft.encoding import EncodeSettings, encode_texts

        settings = EncodeSettings(
            output="embeddings" if project else "features",
            precision=resolve_precision(precision, self.device),
            text_batch_size=batch_size,
            progress=progress,
        )
        vectors = encode_texts(self, texts, settings).vectors
        return _normalized(vectors) if normalize and not project else vectors

    @contextlib.contextmanager
    def inference(self, precision: str | Precision = INFERENCE_DEFAULT) -> Iterator[None]:
        """Eval mode, no autograd and ``precision`` ("fp32", "bf16", "auto" or a :class:`Precision`) for the
        block; the previous train/eval mode comes back afterwards."""
        precision = resolve_precision(precision, self.device)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), autocast(self.device, precision):
                yield
        finally:
            self.train(was_training)

    # -- save / load ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a self-describing directory: ``config.json``, ``model.safetensors``, ``tokenizer/`` and a model
        card ``README.md`` (Hugging Face card format; see :mod:`clipcraft.interop.card`).

        The directory is written beside the target and renamed into place, so an interrupted save never
        leaves a half-written model at ``path``. Returns the path.
        """
        from safetensors.torch import save_file

        target = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "clipcraft_version": __version__,
            "model": self.config.to_dict(),
        }
        with atomic_dir(target) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
            try:
                self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            except PretrainedWeightsError as exc:
                warnings.warn(f"Saving without tokenizer files: {exc}", stacklevel=2)
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            from clipcraft.interop.card import CARD_FILE, model_card, read_run

            # a training run's best/ and last/ describe the run's data and recipe (its metrics are added by
            # write_card once summary.json exists); elsewhere nothing is assumed about the folder around it
            run = read_run(target.parent) if target.name in ("best", "last") else None
            (tmp / CARD_FILE).write_text(model_card(self, run=run))
        return target


def _normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The :class:`ModelConfig` of a saved model directory."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a clipcraft model directory: {CONFIG_FILE} is missing.")
    meta = json.loads(config_file.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_file} is not a clipcraft config (format={meta.get('format')!r}).")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was saved by a newer clipcraft (format {meta['format_version']}); upgrade clipcraft."
        )
    return ModelConfig.from_dict(meta["model"])


def load(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> ClipModel:
    """Rebuild a model saved with :meth:`ClipModel.save`, with no network access; or import a foreign one.

    ``path`` may also be a transformers CLIP/SigLIP directory, ``hf:ID_OR_DIR`` or
    ``open_clip:ARCH,checkpoint=FILE`` (see :func:`clipcraft.interop.import_model`; ``overrides`` apply to
    the imported config the same way). Checks the weights against the architecture and raises :class:`~clipcraft.errors.CheckpointError`
    listing missing, unexpected and mis-shaped keys. ``overrides`` change settings that do not change the
    weights (e.g. ``{"image.lock": True}`` to fine-tune with a locked image tower). Returned in eval mode.
    """
    from safetensors.torch import load_file

    from clipcraft.config import apply_overrides
    from clipcraft.interop import import_model, is_foreign_source

    if is_foreign_source(str(path)):
        model = import_model(str(path))
        if overrides:
            model = _reconfigured(model, apply_overrides(model.config, dict(overrides)))
        return model.to(device).eval()
    root = Path(path)
    config = read_config(root)
    if overrides:
        config = apply_overrides(config, dict(overrides))
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{root} has no {WEIGHTS_FILE}.")
    model = ClipModel(config, image_pretrained=False, text_pretrained=False)
    state = load_file(str(weights))
    load_checked(model, state, str(weights))
    if (root / TOKENIZER_DIR).is_dir():
        model.text_tower.tokenizer = load_tokenizer(str(root / TOKENIZER_DIR), config.text.name)
    return model.to(device).eval()


def _reconfigured(model: ClipModel, config: ModelConfig) -> ClipModel:
    """``model``'s weights and tokenizer in a model built from ``config`` (e.g. with locked towers)."""
    rebuilt = ClipModel(config)
    load_checked(rebuilt, model.state_dict(), "the imported model")
    rebuilt.text_tower.tokenizer = model.text_tower.tokenizer
    return rebuilt


def load_checked(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """``load_state_dict`` that reports every missing, unexpected and mis-shaped key before loading."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: saved {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label}: {keys[:8]}{' ...' if len(keys) > 8 else ''}")
        raise CheckpointError(f"Weights in {where} do not match the model config: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def create_model(
    preset_or_config: str | ModelConfig | Mapping[str, Any] = "seed",
    pretrained: bool | None = None,
    *,
    image_checkpoint: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    checkpoint: str | None = None,
) -> ClipModel:
    """Build a model from a preset name (see :func:`clipcraft.list_presets`), a config, or an existing dual
    encoder: ``"hf:openai/clip-vit-base-patch32"`` or a transformers CLIP/SigLIP directory,
    ``"open_clip:ViT-B-32"`` with ``checkpoint=FILE`` (see :func:`clipcraft.interop.import_model`).

    Args:
        pretrained: None uses the preset's defaults (e.g. ``seed``: both towers pretrained; ``tiny``: none);
            True asks for pretrained weights for both towers; False builds both from random weights. A config
            (not a preset) with None means both pretrained. Weights that cannot be found raise
            :class:`~clipcraft.errors.PretrainedWeightsError`: never a silent fall back to random weights.
        image_checkpoint: a local weights file for the image tower (implies pretrained image weights).
        overrides: dotted config keys to change, e.g. ``{"embed_dim": 256, "image.lock": True}``; for an
            imported model only those that keep the weights' shapes (locking, dropout, grad checkpointing).
        checkpoint: the weights file of an ``open_clip:`` source.
    """
    from clipcraft.config import apply_overrides
    from clipcraft.presets import get_preset

    if isinstance(preset_or_config, str) and (
        preset_or_config.startswith(("hf:", "open_clip:")) or Path(preset_or_config).expanduser().is_dir()
    ):
        from clipcraft.interop import import_model, is_foreign_source

        if not is_foreign_source(preset_or_config):
            raise ClipcraftError(
                f"{preset_or_config} is a directory but not a transformers CLIP/SigLIP model; load a saved "
                "clipcraft model with clipcraft.load."
            )
        if pretrained is False:
            raise ClipcraftError(
                "An imported model is its pretrained weights; pretrained=False has no meaning."
            )
        model = import_model(preset_or_config, checkpoint=checkpoint)
        if overrides:
            model = _reconfigured(model, apply_overrides(model.config, dict(overrides)))
        return model.to(device)
    if checkpoint is not None:
        raise ClipcraftError(
            "checkpoint= is for open_clip: sources; use image_checkpoint= for a preset's image tower."
        )
    if isinstance(preset_or_config, str):
        preset = get_preset(preset_or_config)
        config = preset.config
        image_pre, text_pre = preset.image_pretrained, preset.text_pretrained
    else:
        config = (
            copy.deepcopy(preset_or_config)
            if isinstance(preset_or_config, ModelConfig)
            else ModelConfig.from_dict(dict(preset_or_config))
        )
        image_pre = text_pre = True
    if pretrained is not None:
        image_pre = text_pre = bool(pretrained)
    if overrides:
        config = apply_overrides(config, dict(overrides))
    if image_checkpoint is not None:
        config.image.checkpoint = str(image_checkpoint)
        image_pre = True
    if not math.isfinite(config.init_logit_scale):
        raise ClipcraftError("init_logit_scale must be finite.")
    return ClipModel(config, image_pretrained=image_pre, text_pretrained=text_pre).to(device)
