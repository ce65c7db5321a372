"""Zero-shot classification: class-name files and the text-embedding classifier head (prompt templates:
:mod:`clipcraft.templates`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clipcraft.errors import ClipcraftError
from clipcraft.precision import INFERENCE_DEFAULT, Precision
from clipcraft.templates import (
    DEFAULT_TEMPLATES,
    TEMPLATE_SLOT,
    check_templates,
    load_templates,  # re-exported: the eval and fine-tune commands import it from here
    read_text_lines,
)

__all__ = [
    "DEFAULT_LOGIT_SCALE",
    "ZeroShotClassifier",
    "build_classifier_weights",
    "load_templates",
    "read_classnames",
]

# CLIP's learned temperature usually saturates near this value; used when a model has no ``logit_scale``.
DEFAULT_LOGIT_SCALE = 100.0


def read_classnames(path: str | os.PathLike[str], folders: Sequence[str] | None = None) -> list[str]:
    """Read readable class names from a text file, in file order or in the order of ``folders``.

    Two formats, one per file: ``folder_name<TAB>readable name`` per line (e.g. ``n01440764<TAB>tench``), or
    one readable name per line. Blank lines are skipped; names are stripped. With ``folders`` (e.g. an image
    folder data set's sorted class folders) the names are returned in that order, which needs the tab format
    (or a plain file whose names are the folder names). Raises :class:`ClipcraftError` for mixed formats,
    an empty name, a repeated folder name, an empty file, or a folder missing from the file.
    """
    entries: list[tuple[str, str]] = []
    tabbed: bool | None = None
    for lineno, raw in enumerate(read_text_lines(path, "Class-name"), start=1):
        if not raw.strip():
            continue
        has_tab = "\t" in raw
        if tabbed is None:
            tabbed = has_tab
        elif tabbed != has_tab:
            raise ClipcraftError(
                f"{path}:{lineno}: mixes 'folder<TAB>name' lines with plain name lines; use one format per file."
            )
        key, _, name = raw.partition("\t") if has_tab else (raw, "", raw)
        key, name = key.strip(), name.strip()
        if not key or not name:
            raise ClipcraftError(f"{path}:{lineno}: empty folder or class name in {raw!r}.")
        entries.append((key, name))
    if not entries:
        raise ClipcraftError(f"Class-name file {path} holds no class names.")
    if folders is None:
        return [name for _, name in entries]

    mapping: dict[str, str] = {}
    for key, name in entries:
        if key in mapping:
            raise ClipcraftError(f"{path}: folder {key!r} is listed twice.")
        mapping[key] = name
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise ClipcraftError(
            f"{path} has no name for {len(missing)} of {len(folders)} class folder(s), first: {missing[:5]}."
        )
    return [mapping[f] for f in folders]


def _l2_normalize(x: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if not np.isfinite(x).all() or (norms == 0).any():
        raise ClipcraftError(f"{what} contain a zero, NaN or infinite vector; cannot normalize.")
    return x / norms


def build_classifier_weights(
    encode_texts: Callable[[list[str]], np.ndarray],
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> np.ndarray:
    """The zero-shot head: one unit-norm text embedding per class, averaged over templates.

    ``encode_texts`` maps a list of P prompts to a (P, D) float array (e.g. ``model.encode_texts``). Every
    template is filled with every class name (``{}`` replaced); each prompt embedding is L2-normalized, the
    T prompts of a class are averaged and the mean is L2-normalized again. Returns (C, D) float32, row ``c``
    for ``classnames[c]``. Raises :class:`ClipcraftError` for no classes, no templates, a template without
    ``{}`` or an encoder output of the wrong shape.
    """
    if len(classnames) == 0:
        raise ClipcraftError("Zero-shot classification needs at least one class name.")
    templates = check_templates(templates)
    c, t_count = len(classnames), len(templates)
    prompts = [t.replace(TEMPLATE_SLOT, name) for name in classnames for t in templates]  # class-major
    emb = np.asarray(encode_texts(prompts), dtype=np.float32)  # (C*T, D)
    if emb.ndim != 2 or emb.shape[0] != c * t_count:
        raise ClipcraftError(
            f"encode_texts returned shape {emb.shape} for {c * t_count} prompts; expected (P, D)."
        )
    emb = _l2_normalize(emb, "Text embeddings").reshape(c, t_count, -1)  # (C, T, D)
    return _l2_normalize(emb.mean(axis=1), "Averaged class embeddings").astype(np.float32)  # (C, D)


def _logit_scale_of(model: Any) -> float:
    """exp(model.logit_scale) when the model has one (a float or 0-d tensor holding the log), else 100."""
    raw = getattr(model, "logit_scale", None)
    if raw is None:
        return DEFAULT_LOGIT_SCALE
    if hasattr(raw, "detach"):  # torch tensor or Parameter
        raw = raw.detach().float().cpu().reshape(-1)[0].item()
    return float(math.exp(float(raw)))


class ZeroShotClassifier:
    """Classify images by their similarity to class prompts, with no training.

    ``model`` needs ``encode_texts(list[str], batch_size=..., normalize=True) -> (N, D)`` and, for
    :meth:`predict`, ``encode_images(images, batch_size=..., normalize=True) -> (N, D)``. ``model.logit_scale``,
    when present, holds the log of the softmax scale (a float or a torch scalar); the scale is its exp, else
    :data:`DEFAULT_LOGIT_SCALE`. ``templates`` default to :data:`clipcraft.templates.DEFAULT_TEMPLATES`.
    ``precision`` (fp32 by default; ``bf16`` or ``auto`` on request) is used for the prompts and for the
    images of :meth:`predict` alike, and passed to the model's ``encode_texts`` / ``encode_images``.
    ``encode``, when given, embeds the prompts instead (P prompts -> (P, D)); the evaluation runner passes
    its cached encoder.

    Attributes: ``classnames`` (list), ``templates`` (list), ``weights`` (C, D) float32 unit rows,
    ``logit_scale`` (float, already exponentiated).
    """

    def __init__(
        self,
        model: Any,
        classnames: Sequence[str],
        templates: Sequence[str] | None = None,
        *,
        batch_size: int = 256,
        precision: str | Precision = INFERENCE_DEFAULT,
        encode: Callable[[list[str]], np.ndarray] | None = None,
    ) -> None:
        self.model = model
        self.precision = precision
        self.classnames = list(classnames)
        self.templates = list(DEFAULT_TEMPLATES if templates is None else templates)
        self.logit_scale = _logit_scale_of(model)

        def default_encode(prompts: list[str]) -> np.ndarray:
            return model.encode_texts(prompts, batch_size=batch_size, normalize=True, precision=precision)

        weights = build_classifier_weights(encode or default_encode, self.classnames, self.templates)
        self.weights = weights  # (C, D)

    def logits(self, image_emb: np.ndarray) -> np.ndarray:
        """Scaled cosine similarities (N, C) float32 for image embeddings (N, D); rows are re-normalized."""
        image_emb = np.asarray(image_emb, dtype=np.float32)
        if image_emb.ndim != 2 or image_emb.shape[1] != self.weights.shape[1]:
            raise ClipcraftError(
                f"Image embeddings must be (N, {self.weights.shape[1]}) to match the class embeddings; "
                f"got {image_emb.shape}."
            )
        return self.logit_scale * (_l2_normalize(image_emb, "Image embeddings") @ self.weights.T)  # (N, C)

    def predict_embeddings(self, image_emb: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Predicted class names (N,) and softmax probabilities (N, C) float32 for image embeddings (N, D).

        The label is the argmax of the probabilities (ties: lower class index), i.e. of the cosine similarity.
        With one class the probability is always 1.0: a softmax over one label has nothing to compare against.
        """
        logits = self.logits(image_emb).astype(np.float64)  # (N, C)
        logits -= logits.max(axis=1, keepdims=True)  # stable softmax
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)  # (N, C)
        labels = [self.classnames[i] for i in probs.argmax(axis=1)]
        return labels, probs.astype(np.float32)

    def predict(self, images: Sequence[Any], batch_size: int = 64) -> tuple[list[str], np.ndarray]:
        """Embed ``images`` (PIL images or paths) with ``model.encode_images`` and classify them.

        Returns the same as :meth:`predict_embeddings`: labels (N,) and probabilities (N, C) float32.
        """
        image_emb = self.model.encode_images(
            list(images), batch_size=batch_size, normalize=True, precision=self.precision
        )  # (N, D), in the prompts' precision
        return self.predict_embeddings(image_emb)
