"""An image classifier made from a clipcraft model: its image side plus a linear head over the normalised
image embeddings, initialised from the zero-shot text embeddings of the class names.

A saved classifier is a normal clipcraft model directory (``config.json``, ``model.safetensors``,
``tokenizer/``; :func:`clipcraft.load` reads it) plus ``classifier.safetensors`` (the head) and
``classifier.json`` (class names, folder keys, templates and how the head was made).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clipcraft import __version__
from clipcraft.errors import CheckpointError, ClipcraftError
from clipcraft.evaluation.zeroshot import DEFAULT_LOGIT_SCALE, ZeroShotClassifier
from clipcraft.images import ImageInput
from clipcraft.model import ClipModel, load, load_checked

CLASSIFIER_FORMAT = "clipcraft-classifier"
CLASSIFIER_FORMAT_VERSION = 1
CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"

# The weights fine-tuning changes (and weight-space ensembling mixes): the image tower, its projection head
# and the classifier head. The text side and the temperature stay as the zero-shot model had them.
TRAINABLE_PREFIXES = ("model.image_tower.", "model.image_head.", "head.")


class ClassifierHead(nn.Module):
    """``logits = scale * embeddings @ weight.T + bias``: (B, D) unit-norm image embeddings -> (B, C).

    ``weight`` (C, D) starts as the zero-shot class embeddings (unit rows) and ``bias`` (C,) at zero, so the
    head's first logits are exactly zero-shot CLIP's. ``scale`` is a fixed buffer (the model's exp(logit
    scale)); keeping it outside ``weight`` leaves the weight on the same scale as the other layers, so one
    learning rate suits the head from the first step.
    """

    def __init__(self, num_classes: int, embed_dim: int, scale: float = DEFAULT_LOGIT_SCALE) -> None:
        super().__init__()
        if num_classes < 1 or embed_dim < 1:
            raise ClipcraftError(
                f"A classifier head needs >= 1 class and dimension; got {num_classes}, {embed_dim}."
            )
        self.weight = nn.Parameter(torch.zeros(num_classes, embed_dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("scale", torch.tensor(float(scale)))

    @classmethod
    def from_class_embeddings(cls, class_embeddings: np.ndarray, scale: float) -> ClassifierHead:
        """A head whose weight is ``class_embeddings`` (C, D) and whose bias is zero."""
        emb = np.asarray(class_embeddings, dtype=np.float32)
        if emb.ndim != 2:
            raise ClipcraftError(f"class_embeddings must be (C, D); got shape {emb.shape}.")
        head = cls(emb.shape[0], emb.shape[1], scale)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(emb))
        return head

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, embeddings: Tensor) -> Tensor:
        """(B, D) normalised embeddings -> (B, C) logits."""
        return self.scale * (embeddings @ self.weight.T) + self.bias


class ImageClassifier(nn.Module):
    """A :class:`~clipcraft.model.ClipModel` with a :class:`ClassifierHead` on its image embeddings.

    ``forward(images)`` maps (B, 3, H, W) preprocessed pixels (``model.image_transform``) to (B, C) logits;
    :meth:`predict` classifies image files or PIL images. Building one freezes the model's text tower, text
    head, logit scale and bias (``requires_grad=False``): only :data:`TRAINABLE_PREFIXES` train.

    Attributes: ``model``, ``head``, ``classnames`` (C readable names, used in prompts and predictions),
    ``keys`` (C class folder names or CSV labels), ``templates`` (the prompts the head was built from).
    """

    def __init__(
        self,
        model: ClipModel,
        head: ClassifierHead,
        classnames: Sequence[str],
        keys: Sequence[str] | None = None,
        templates: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if head.num_classes != len(classnames):
            raise ClipcraftError(
                f"The head has {head.num_classes} classes but {len(classnames)} names were given."
            )
        if head.weight.shape[1] != model.embed_dim:
            raise ClipcraftError(
                f"The head takes {head.weight.shape[1]}-d embeddings but the model's are {model.embed_dim}-d."
            )
        self.model = model
        self.head = head.to(model.device)
        self.classnames = list(classnames)
        self.keys = list(keys) if keys is not None else list(classnames)
        self.templates = list(templates)
        for module in (model.text_tower, model.text_head):
            module.requires_grad_(False)
        model.logit_scale.requires_grad_(False)
        model.logit_bias.requires_grad_(False)
        # what trainable_state covers; FLYP widens it to the whole model (both towers, heads, temperature)
        self.trainable_prefixes: tuple[str, ...] = TRAINABLE_PREFIXES

    @classmethod
    def from_zeroshot(
        cls,
        model: ClipModel,
        classnames: Sequence[str],
        templates: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
    ) -> ImageClassifier:
        """The zero-shot classifier as a trainable module: the head's rows are the class-name text embeddings
        averaged over ``templates`` (default: the built-in set) exactly as
        :class:`~clipcraft.evaluation.zeroshot.ZeroShotClassifier` builds them, scaled by the model's
        temperature, so its predictions equal zero-shot CLIP's."""
        zeroshot = ZeroShotClassifier(model, classnames, templates)
        head = ClassifierHead.from_class_embeddings(zeroshot.weights, zeroshot.logit_scale)
        return cls(model, head, zeroshot.classnames, keys, zeroshot.templates)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- forward and inference ------------------------------------------------------------------------------

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, C) logits."""
        return self.head(self.model.embed_image_features(self.model.image_tower(images)))

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) image embeddings (re-normalised here) -> (N, C) float32 logits."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.model.embed_dim:
            raise ClipcraftError(f"Image embeddings must be (N, {self.model.embed_dim}); got {emb.shape}.")
        with torch.inference_mode():
            x = nn.functional.normalize(torch.from_numpy(emb).to(self.device), dim=-1)  # (N, D)
            return self.head(x).float().cpu().numpy()  # (N, C)

    def predict_embeddings(self, embeddings: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Predicted class names (N,) and softmax probabilities (N, C) float32 for image embeddings (N, D);
        the label is the argmax (ties: the lower class index)."""
        logits = self.logits(embeddings).astype(np.float64)  # (N, C)
        logits -= logits.max(axis=1, keepdims=True)  # stable softmax
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        return [self.classnames[i] for i in probs.argmax(axis=1)], probs.astype(np.float32)

    def predict(self, images: Sequence[ImageInput], batch_size: int = 64) -> tuple[list[str], np.ndarray]:
        """Classify file paths or PIL images: labels (N,) and probabilities (N, C), as :meth:`predict_embeddings`.
        Raises :class:`~clipcraft.errors.ImageLoadError` naming a file that cannot be read."""
        emb = self.model.encode_images(list(images), batch_size=batch_size, normalize=True)  # (N, D)
        return self.predict_embeddings(emb)

    # -- the weights fine-tuning changes --------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Tensor]:
        """The state-dict entries under ``trainable_prefixes`` (default :data:`TRAINABLE_PREFIXES`; live
        tensors, not copies)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.trainable_prefixes)}

    def load_trainable_state(self, state: Mapping[str, Tensor]) -> None:
        """Copy ``state`` (the keys of :meth:`trainable_state`, no more, no fewer) into the module."""
        expected = self.trainable_state()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"Classifier weights do not match: {len(missing)} missing {missing[:5]}, "
                f"{len(unexpected)} unexpected {unexpected[:5]}."
            )
        with torch.no_grad():
            for key, value in state.items():
                if tuple(value.shape) != tuple(expected[key].shape):
                    raise CheckpointError(
                        f"Classifier weight {key} is {tuple(value.shape)}; the model has {tuple(expected[key].shape)}."
                    )
                expected[key].copy_(value)

    # -- save -----------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], info: Mapping[str, Any] | None = None) -> Path:
        """Write the model directory (see the module docstring) to ``path``; ``info`` (JSON-ready) is stored
        in ``classifier.json`` under ``"info"``.

        The files are written beside ``path`` and then moved in one by one, ``classifier.json`` last, so a
        directory holding it is complete. Other files already in ``path`` (a fine-tuning run's metrics and
        checkpoint) are kept. Returns the path.
        """
        from safetensors.torch import save_file

        target = Path(path)
        target.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.classifier-tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save(tmp)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(tmp / CLASSIFIER_WEIGHTS), metadata={"format": CLASSIFIER_FORMAT})
        meta = {
            "format": CLASSIFIER_FORMAT,
            "format_version": CLASSIFIER_FORMAT_VERSION,
            "clipcraft_version": __version__,
            "num_classes": self.head.num_classes,
            "classnames": self.classnames,
            "keys": self.keys,
            "templates": self.templates,
            "info": dict(info or {}),
        }
        (tmp / CLASSIFIER_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        (target / CLASSIFIER_JSON).unlink(missing_ok=True)  # the directory is incomplete until it returns
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == CLASSIFIER_JSON):
            dest = target / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
        tmp.rmdir()
        return target


def has_classifier(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a saved fine-tuned classifier (holds ``classifier.json``)."""
    return (Path(path) / CLASSIFIER_JSON).is_file()


def read_classifier_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``classifier.json`` of a saved classifier; :class:`CheckpointError` when it is missing or
    not a clipcraft classifier file."""
    meta_file = Path(path) / CLASSIFIER_JSON
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} has no {CLASSIFIER_JSON}: it is not a fine-tuned classifier (make one with `clipcraft "
            "finetune`, or classify zero-shot with `clipcraft classify --labels ...`)."
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_file} is not valid JSON: {exc}") from exc
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{meta_file} is not a clipcraft classifier (format={meta.get('format')!r}).")
    if int(meta.get("format_version", 0)) > CLASSIFIER_FORMAT_VERSION:
        raise CheckpointError(f"{meta_file} was written by a newer clipcraft; upgrade clipcraft.")
    return meta


def load_classifier(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ImageClassifier:
    """Rebuild a classifier saved by :meth:`ImageClassifier.save`, in eval mode, with no network access.

    Raises :class:`CheckpointError` when ``path`` is not a saved classifier or its head weights do not match
    its class list and the model's embedding size.
    """
    from safetensors.torch import load_file

    meta = read_classifier_info(path)
    model = load(path, device=device)
    weights = Path(path) / CLASSIFIER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path} has {CLASSIFIER_JSON} but no {CLASSIFIER_WEIGHTS}.")
    head = ClassifierHead(len(meta["classnames"]), model.embed_dim)
    load_checked(head, load_file(str(weights)), str(weights))
    classifier = ImageClassifier(model, head, meta["classnames"], meta.get("keys"), meta.get("templates", ()))
    return classifier.eval()
