"""Evaluation of CLIP embeddings: retrieval metrics, zero-shot classification, linear probes, plots.

Everything here is a pure function over arrays or takes a model only through ``encode_images`` /
``encode_texts``. Importing this package needs numpy only; scikit-learn (linear probe) and matplotlib (plots)
are imported by the functions that use them.
"""

from clipcraft.evaluation.linear_probe import DEFAULT_L2_GRID, LinearProbe, fit_linear_probe, stratified_split
from clipcraft.evaluation.metrics import classification_metrics, confusion_matrix, plot_confusion_matrix
from clipcraft.evaluation.retrieval import (
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_metrics_from_similarity,
    retrieval_ranks,
    retrieval_ranks_from_similarity,
)
from clipcraft.evaluation.zeroshot import (
    DEFAULT_LOGIT_SCALE,
    DEFAULT_TEMPLATES,
    ZeroShotClassifier,
    build_classifier_weights,
    load_templates,
    read_classnames,
)

__all__ = [
    "DEFAULT_L2_GRID",
    "DEFAULT_LOGIT_SCALE",
    "DEFAULT_TEMPLATES",
    "LinearProbe",
    "ZeroShotClassifier",
    "build_classifier_weights",
    "classification_metrics",
    "confusion_matrix",
    "fit_linear_probe",
    "load_templates",
    "metrics_from_ranks",
    "plot_confusion_matrix",
    "read_classnames",
    "retrieval_metrics",
    "retrieval_metrics_from_similarity",
    "retrieval_ranks",
    "retrieval_ranks_from_similarity",
    "stratified_split",
]
