"""Evaluation runners: dataset -> embeddings (batched, cached) -> metrics -> a flat, JSON-ready result.

Each runner takes a model and data paths and returns a ``dict`` whose metric keys are fixed
(:data:`RETRIEVAL_KEYS`, :data:`CLASSIFICATION_KEYS`); the rest of the dict says what was measured (counts,
skipped files, split, settings). :func:`format_table` renders one for people. The metrics themselves are the
pure functions of :mod:`clipcraft.evaluation.retrieval` and :mod:`clipcraft.evaluation.metrics`.

Every runner encodes through :mod:`clipcraft.encoding` and takes the same three encoding arguments:
``settings`` (:class:`~clipcraft.encoding.EncodeSettings`: batch size, workers, progress; fp32 by default),
``precision`` (the user's word, ``fp32``/``bf16``/``auto``, resolved here once and used for the images and
the texts alike) and ``cache_dir`` (a folder of cached vectors, keyed on model, inputs, preprocessing,
output kind and precision). The precision that ran is the result's ``precision``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcraft.errors import ClipcraftError, unknown_name
from clipcraft.evaluation.labelled import LabelledImages, open_labelled
from clipcraft.precision import Precision, resolve_precision

if TYPE_CHECKING:  # torch loads only when a runner encodes, so importing the package stays light
    from clipcraft.encoding import Encoded, EncodeSettings

TASKS = ("retrieval", "zeroshot", "linear-probe")
RETRIEVAL_KEYS = (
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "i2t_mean_rank",
    "i2t_median_rank",
    "t2i_mean_rank",
    "t2i_median_rank",
)
CLASSIFICATION_KEYS = ("top1", "top5", "mean_per_class_recall", "num_images", "num_classes")
FEATURE_KINDS = ("post", "pre")  # post: projected, normalized embeddings; pre: image tower features

# How many skipped files a result lists by name (all are counted in ``num_skipped``).
MAX_LISTED_SKIPS = 20


class _Encoder:
    """One evaluation's encoding: one model, one :class:`EncodeSettings` (so images and texts share one
    precision), one optional cache; the model is hashed once, for the cache keys."""

    def __init__(
        self,
        model: Any,
        settings: EncodeSettings | None,
        precision: str | Precision | None,
        cache_dir: str | os.PathLike[str] | None,
    ) -> None:
        from clipcraft.encoding import EncodeSettings, EncodingCache, with_settings

        self.model = model
        settings = settings or EncodeSettings()
        if precision is not None:  # the user's word, resolved here at the edge
            settings = with_settings(settings, precision=resolve_precision(precision, model.device))
        self.settings = settings
        self.cache = EncodingCache(cache_dir) if cache_dir else None
        self.identity = None
        if self.cache is not None:
            from clipcraft.digests import model_identity

            self.identity = model_identity(model)

    def images(self, paths: Sequence[str], output: str = "embeddings") -> Encoded:
        from clipcraft.encoding import encode_images, with_settings

        settings = with_settings(self.settings, output=output)
        return encode_images(self.model, paths, settings, cache=self.cache, identity=self.identity)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        from clipcraft.encoding import encode_texts

        return encode_texts(
            self.model, texts, self.settings, cache=self.cache, identity=self.identity
        ).vectors

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"precision": self.settings.precision.value}
        if self.cache is not None:
            out["cache"] = {"dir": str(self.cache.root), "hits": self.cache.hits, "misses": self.cache.misses}
        return out


def _skips(*sets: Encoded) -> dict[str, Any]:
    failed = [f for s in sets for f in s.failed]
    return {
        "num_skipped": len(failed),
        "skipped": [{"path": bad.where, "reason": bad.reason} for bad in failed[:MAX_LISTED_SKIPS]],
    }


# -- retrieval ----------------------------------------------------------------------------------------------


def _looks_like_class_folder(path: Path) -> bool:
    return path.is_dir() and any(d.is_dir() for d in path.iterdir())


def load_caption_records(
    data: str | os.PathLike[str], split: str | None = None, limit: int | None = None
) -> tuple[list[str], list[tuple[str, ...]], str, int]:
    """Image paths, their captions, the split used and the number of bad rows the reader dropped (missing
    files, empty captions...; see :mod:`clipcraft.data.report`), from any map-style caption dataset.

    ``split`` None means ``test`` for a Flickr folder (its official split) and ``all`` otherwise. ``limit``
    keeps the first N images. Raises :class:`ClipcraftError` when the data has no captions (e.g. a folder of
    class subfolders), is a webdataset stream, or is empty.
    """
    from clipcraft.data import CaptionDataset, detect_format, open_dataset

    path = Path(data)
    try:
        fmt = detect_format(path)
    except ClipcraftError as exc:
        if _looks_like_class_folder(path):
            raise ClipcraftError(
                f"{path} has no captions (no captions.txt or metadata file; it looks like a folder of class "
                "subfolders). Retrieval needs image-caption pairs: a Flickr folder, an image folder with "
                "metadata.jsonl, a CSV/JSONL of image,caption or a COCO captions JSON. For class folders use "
                "`clipcraft eval zeroshot`."
            ) from exc
        raise
    if split is None:
        split = "test" if fmt == "flickr" else "all"
    dataset = open_dataset(path, split=split)
    if not isinstance(dataset, CaptionDataset):
        raise ClipcraftError(
            f"{path} is a {fmt} stream; retrieval needs a map-style dataset (Flickr folder, image folder with "
            "metadata, CSV/JSONL or COCO JSON) so that every image can be ranked against every caption."
        )
    records = [r for r in dataset.records if r.captions]
    if limit is not None:
        if limit < 1:
            raise ClipcraftError(f"limit must be a positive integer; got {limit}.")
        records = records[:limit]
    if not records:
        raise ClipcraftError(
            f"{path} [{split}] has no captioned images; retrieval needs image-caption pairs."
        )
    paths = [r.image for r in records]
    return paths, [tuple(r.captions) for r in records], dataset.split, dataset.report.num_bad


def evaluate_retrieval(
    model: Any,
    data: str | os.PathLike[str],
    *,
    split: str | None = None,
    limit: int | None = None,
    settings: EncodeSettings | None = None,
    precision: str | Precision | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Image<->text retrieval by the multi-caption protocol on ``data`` (see :func:`load_caption_records`).

    Images that fail to decode are dropped together with their captions and counted in ``num_skipped``.
    Returns :data:`RETRIEVAL_KEYS` (recalls as fractions, ranks 1-based) plus ``num_images``,
    ``num_captions`` (after skips), ``num_skipped``, ``skipped``, ``num_bad_rows`` (rows the reader dropped),
    ``split``, ``precision`` and ``seconds``.
    """
    from clipcraft.evaluation.retrieval import retrieval_metrics

    start = time.perf_counter()
    encoder = _Encoder(model, settings, precision, cache_dir)
    paths, captions, used_split, bad_rows = load_caption_records(data, split, limit)
    img = encoder.images(paths)
    if img.vectors.shape[0] == 0:
        raise ClipcraftError(f"None of the {len(paths)} images of {data} could be decoded; nothing to rank.")
    flat = [c for caps in captions for c in caps]
    owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])  # (N_txt,) image of each caption
    txt = encoder.texts(flat)  # (N_txt, D)
    new_index = np.full(len(paths), -1, dtype=np.int64)
    new_index[img.kept] = np.arange(img.kept.size)
    keep_txt = new_index[owner] >= 0
    metrics = retrieval_metrics(img.vectors, txt[keep_txt], new_index[owner][keep_txt], chunk_size=chunk_size)
    return {
        "task": "retrieval",
        **{k: metrics[k] for k in RETRIEVAL_KEYS},
        "num_images": int(img.kept.size),
        "num_captions": int(keep_txt.sum()),
        **_skips(img),
        "num_bad_rows": bad_rows,
        "data": str(data),
        "split": used_split,
        **encoder.summary(),
        "seconds": round(time.perf_counter() - start, 2),
    }


# -- zero-shot ----------------------------------------------------------------------------------------------


def evaluate_zeroshot(
    model: Any,
    data: str | os.PathLike[str],
    *,
    split: str | None = None,
    classnames_file: str | os.PathLike[str] | None = None,
    templates_file: str | os.PathLike[str] | None = None,
    limit_per_class: int | None = None,
    confusion_png: str | os.PathLike[str] | None = None,
    settings: EncodeSettings | None = None,
    precision: str | Precision | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Zero-shot classification of a labelled image set (see :func:`open_labelled`).

    Class prompts come from ``templates_file`` (one template per line with ``{}``) or the default set; the
    classifier is :class:`~clipcraft.evaluation.zeroshot.ZeroShotClassifier`. Returns
    :data:`CLASSIFICATION_KEYS` plus ``per_class_recall``, ``num_skipped``, ``skipped``, ``num_templates`` and
    settings; with ``confusion_png`` the row-normalized confusion matrix is written there.
    """
    from clipcraft.evaluation.metrics import classification_metrics, confusion_matrix, plot_confusion_matrix
    from clipcraft.evaluation.zeroshot import ZeroShotClassifier, load_templates

    start = time.perf_counter()
    encoder = _Encoder(model, settings, precision, cache_dir)
    labelled = open_labelled(data, classnames_file, split=split, limit_per_class=limit_per_class)
    templates = load_templates(templates_file) if templates_file is not None else None
    img = encoder.images(labelled.paths)
    if img.vectors.shape[0] == 0:
        raise ClipcraftError(f"None of the {len(labelled)} images in {labelled.source} could be decoded.")
    classifier = ZeroShotClassifier(
        model, labelled.classnames, templates, precision=encoder.settings.precision, encode=encoder.texts
    )
    scores = classifier.logits(img.vectors)  # (N_ok, C)
    labels = labelled.labels[img.kept]  # (N_ok,)
    metrics = classification_metrics(scores, labels)
    cm = confusion_matrix(scores.argmax(axis=1), labels, labelled.num_classes)  # (C, C)
    result = _classification_result("zeroshot", metrics, cm, labelled.classnames)
    result.update(_skips(img))
    result.update({"num_templates": len(classifier.templates), "data": labelled.source, **encoder.summary()})
    if confusion_png is not None:
        title = f"zero-shot, {labelled.source}: top-1 {metrics['top1']:.3f}"
        result["confusion_png"] = str(
            plot_confusion_matrix(cm, labelled.classnames, confusion_png, title=title)
        )
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _classification_result(
    task: str, metrics: dict[str, float], cm: np.ndarray, classnames: Sequence[str]
) -> dict[str, Any]:
    sizes = cm.sum(axis=1)
    per_class = {
        name: float(cm[i, i] / sizes[i]) for i, name in enumerate(classnames) if sizes[i] > 0
    }  # top-1 recall of each class with images
    return {
        "task": task,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "mean_per_class_recall": metrics["mean_per_class_recall"],
        "num_images": int(metrics["num_images"]),
        "num_classes": int(metrics["num_classes"]),
        "per_class_recall": per_class,
    }


# -- linear probe -------------------------------------------------------------------------------------------


def resolve_probe_data(
    data: str | os.PathLike[str] | None,
    train: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    split: str | None = None,
) -> tuple[Path, Path]:
    """Train and test folders (or CSVs): explicit ``train``/``test``, else ``data/train`` and ``data/<split>``
    (``split`` default ``test``)."""
    if train is None or test is None:
        if data is None:
            raise ClipcraftError(
                "A linear probe needs --data ROOT (with train/ and test/) or both --train-data and --test-data."
            )
        root = Path(data)
        train = train if train is not None else root / "train"
        test = test if test is not None else root / (split or "test")
    for what, p in (("training", Path(train)), ("test", Path(test))):
        if not p.exists():
            raise ClipcraftError(
                f"The {what} data {p} does not exist; give --data ROOT with train/ and test/ class folders, "
                "or --train-data and --test-data."
            )
    return Path(train), Path(test)


def evaluate_linear_probe(
    model: Any,
    train: str | os.PathLike[str],
    test: str | os.PathLike[str],
    *,
    features: str = "post",
    classnames_file: str | os.PathLike[str] | None = None,
    limit_per_class: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    l2_grid: Sequence[float] | None = None,
    settings: EncodeSettings | None = None,
    precision: str | Precision | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Linear probe: logistic regression on frozen image vectors of ``train``, scored on ``test``.

    ``features``: ``post`` = normalized embeddings (what zero-shot uses), ``pre`` = the image tower's pooled
    features before the projection head. The L2 strength is chosen on a stratified ``val_fraction`` of the
    training set from ``l2_grid`` (default :data:`~clipcraft.evaluation.linear_probe.DEFAULT_L2_GRID`; see
    :func:`~clipcraft.evaluation.linear_probe.fit_linear_probe`). Test classes must all
    occur in training (matched by folder name / CSV label). Returns :data:`CLASSIFICATION_KEYS` plus
    ``per_class_recall``, ``l2``, ``val_accuracy``, ``num_train``, ``num_skipped`` and settings.
    """
    from clipcraft.evaluation.linear_probe import DEFAULT_L2_GRID, fit_linear_probe
    from clipcraft.evaluation.metrics import confusion_matrix

    if features not in FEATURE_KINDS:
        raise unknown_name("feature kind", features, list(FEATURE_KINDS))
    start = time.perf_counter()
    encoder = _Encoder(model, settings, precision, cache_dir)
    train_set = open_labelled(train, classnames_file, limit_per_class=limit_per_class)
    test_set = open_labelled(test, classnames_file, limit_per_class=limit_per_class)
    unknown = sorted(set(test_set.keys) - set(train_set.keys))
    if unknown:
        raise ClipcraftError(
            f"{len(unknown)} test class(es) are not in the training data {train_set.source}: {unknown[:5]}."
        )
    output = "embeddings" if features == "post" else "features"
    tr = encoder.images(train_set.paths, output)
    te = encoder.images(test_set.paths, output)
    for name, s, e in (("training", train_set, tr), ("test", test_set, te)):
        if e.vectors.shape[0] == 0:
            raise ClipcraftError(f"None of the {len(s)} {name} images in {s.source} could be decoded.")
    key_index = {k: i for i, k in enumerate(train_set.keys)}
    to_train = np.asarray([key_index[k] for k in test_set.keys], dtype=np.int64)
    y_train = train_set.labels[tr.kept]  # (N_tr,) indices into train_set.keys
    y_test = to_train[test_set.labels[te.kept]]  # (N_te,) same index space
    probe = fit_linear_probe(
        tr.vectors, y_train, val_fraction=val_fraction, seed=seed, l2_grid=l2_grid or DEFAULT_L2_GRID
    )
    metrics = probe.evaluate(te.vectors, y_test)
    pred = probe.predict(te.vectors)  # (N_te,) labels from probe.classes (train indices)
    cm = confusion_matrix(pred, y_test, train_set.num_classes)  # (C, C) over all training classes
    result = _classification_result("linear-probe", metrics, cm, train_set.classnames)
    result["num_classes"] = train_set.num_classes
    result.update(_skips(tr, te))
    result.update(
        {
            "features": features,
            "feature_dim": int(tr.vectors.shape[1]),
            "l2": probe.l2,
            "val_accuracy": {str(k): v for k, v in probe.val_accuracy.items()},
            "converged": probe.converged,
            "num_train": int(tr.kept.size),
            "train_data": train_set.source,
            "test_data": test_set.source,
            **encoder.summary(),
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    return result


# -- dispatch and presentation ------------------------------------------------------------------------------


def metric_keys(task: str) -> tuple[str, ...]:
    """The fixed metric keys of ``task`` (one of :data:`TASKS`)."""
    if task == "retrieval":
        return RETRIEVAL_KEYS
    if task in ("zeroshot", "linear-probe"):
        return CLASSIFICATION_KEYS
    raise unknown_name("evaluation", task, list(TASKS))


def select_metrics(task: str, names: Sequence[str] | None) -> tuple[str, ...]:
    """The metric keys to show: all of ``task``'s, or ``names`` checked against them (unknown -> error)."""
    known = metric_keys(task)
    if not names:
        return known
    for name in names:
        if name not in known:
            raise unknown_name(f"{task} metric", name, list(known))
    return tuple(names)


def _fmt(key: str, value: Any) -> str:
    if key.startswith("num_"):
        return f"{int(value):,}"
    if "rank" in key:
        return f"{value:.1f}"
    return f"{value:.4f}  ({100 * value:5.1f}%)"


def format_table(result: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """A readable two-column table of ``result``'s metrics (``keys``, default: all of its task's keys)."""
    keys = tuple(keys) if keys else metric_keys(str(result["task"]))
    rows = [(k, _fmt(k, result[k])) for k in keys]
    for extra in ("num_images", "num_captions", "num_train", "num_skipped"):
        if extra in result and extra not in keys:
            rows.append((extra, _fmt(extra, result[extra])))
    width = max(len(k) for k, _ in rows)
    title = f"{result['task']} on {result.get('data', result.get('test_data', ''))}"
    if result.get("split"):
        title += f" [{result['split']}]"
    lines = [title, "-" * max(len(title), width + 20)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``result`` as indented JSON (parent folders created)."""
    import json

    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        raise ClipcraftError(f"Could not write {out}: {exc}") from exc
    return out


__all__ = [
    "CLASSIFICATION_KEYS",
    "FEATURE_KINDS",
    "RETRIEVAL_KEYS",
    "TASKS",
    "LabelledImages",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "format_table",
    "load_caption_records",
    "metric_keys",
    "resolve_probe_data",
    "select_metrics",
    "write_json",
]
