"""Evaluation of CLIP embeddings: retrieval metrics, zero-shot classification, linear probes, plots.

The metrics are pure functions over arrays; the runners (``evaluate_retrieval``, ``evaluate_zeroshot``,
``evaluate_linear_probe``) go from a model and data paths to embeddings (batched, cached; see
:mod:`clipcraft.encoding`) to metrics. Importing this package needs numpy and PIL only; torch, scikit-learn (linear
probe) and matplotlib (plots) are imported by the functions that use them.
"""

from clipcraft.evaluation.labelled import LabelledImages, open_labelled, read_class_folder, read_label_csv
from clipcraft.evaluation.linear_probe import DEFAULT_L2_GRID, LinearProbe, fit_linear_probe, stratified_split
from clipcraft.evaluation.metrics import classification_metrics, confusion_matrix, plot_confusion_matrix
from clipcraft.evaluation.retrieval import (
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_metrics_from_similarity,
    retrieval_ranks,
    retrieval_ranks_from_similarity,
)
from clipcraft.evaluation.runners import (
    evaluate_linear_probe,
    evaluate_retrieval,
    evaluate_zeroshot,
    format_table,
)
from clipcraft.evaluation.zeroshot import (
    DEFAULT_LOGIT_SCALE,
    ZeroShotClassifier,
    build_classifier_weights,
    read_classnames,
)
from clipcraft.templates import DEFAULT_TEMPLATES, load_templates

__all__ = [
    "DEFAULT_L2_GRID",
    "DEFAULT_LOGIT_SCALE",
    "DEFAULT_TEMPLATES",
    "LabelledImages",
    "LinearProbe",
    "ZeroShotClassifier",
    "build_classifier_weights",
    "classification_metrics",
    "confusion_matrix",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "fit_linear_probe",
    "format_table",
    "load_templates",
    "metrics_from_ranks",
    "open_labelled",
    "plot_confusion_matrix",
    "read_class_folder",
    "read_classnames",
    "read_label_csv",
    "retrieval_metrics",
    "retrieval_metrics_from_similarity",
    "retrieval_ranks",
    "retrieval_ranks_from_similarity",
    "stratified_split",
]
