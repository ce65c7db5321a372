"""Fine-tuning a classifier from a clipcraft model: the zero-shot head, training with the training loop's
pieces, weight-space ensembling with the zero-shot weights, and the saved classifier.

Importing this package is light (the CLI registers ``clipcraft finetune`` from it); torch loads on first use
of a name below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "DEFAULT_ALPHAS",
    "ClassifierHead",
    "FinetuneConfig",
    "FinetuneResult",
    "ImageClassifier",
    "evaluate_classifier",
    "finetune",
    "has_classifier",
    "interpolate_weights",
    "load_classifier",
    "read_classification_data",
]

if TYPE_CHECKING:
    from clipcraft.finetune.classifier import ClassifierHead, ImageClassifier, has_classifier, load_classifier
    from clipcraft.finetune.config import DEFAULT_ALPHAS, FinetuneConfig
    from clipcraft.finetune.data import read_classification_data
    from clipcraft.finetune.loop import FinetuneResult, evaluate_classifier, finetune
    from clipcraft.finetune.wise import interpolate_weights

_LAZY = {
    "ClassifierHead": "clipcraft.finetune.classifier",
    "ImageClassifier": "clipcraft.finetune.classifier",
    "has_classifier": "clipcraft.finetune.classifier",
    "load_classifier": "clipcraft.finetune.classifier",
    "DEFAULT_ALPHAS": "clipcraft.finetune.config",
    "FinetuneConfig": "clipcraft.finetune.config",
    "read_classification_data": "clipcraft.finetune.data",
    "FinetuneResult": "clipcraft.finetune.loop",
    "evaluate_classifier": "clipcraft.finetune.loop",
    "finetune": "clipcraft.finetune.loop",
    "interpolate_weights": "clipcraft.finetune.wise",
}


def __getattr__(name: str) -> Any:
    import importlib

    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clipcraft.finetune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
