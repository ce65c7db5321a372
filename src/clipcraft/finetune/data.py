"""The labelled splits of a fine-tuning run, checked before any work starts, and the training images with
per-sample seeded augmentation (so a resumed run sees exactly the batches an uninterrupted one would)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipcraft.errors import ClipcraftError, ImageLoadError
from clipcraft.evaluation.labelled import LabelledImages, read_class_folder, read_label_csv
from clipcraft.evaluation.linear_probe import stratified_split


@dataclass
class ClassificationData:
    """Train, validation and (optional) test images over one class list.

    All splits share ``keys`` (C,) sorted class folder names (or CSV labels) and ``classnames`` (C,) readable
    names; every split's ``labels`` index into them.
    """

    train: LabelledImages
    val: LabelledImages
    test: LabelledImages | None

    @property
    def keys(self) -> list[str]:
        return self.train.keys

    @property
    def classnames(self) -> list[str]:
        return self.train.classnames

    def describe(self) -> dict[str, Any]:
        """Sizes and sources, JSON-ready."""
        out: dict[str, Any] = {"num_classes": len(self.keys), "classnames": self.classnames}
        for name, split in (("train", self.train), ("val", self.val), ("test", self.test)):
            if split is not None:
                out[f"num_{name}"] = len(split)
                out[f"{name}_source"] = split.source
        return out


def read_labelled(
    path: str | os.PathLike[str],
    classnames_file: str | os.PathLike[str] | None = None,
    limit_per_class: int | None = None,
) -> LabelledImages:
    """A class folder (one subfolder of images per class) or an image,label CSV/TSV file."""
    p = Path(path)
    if p.is_file():
        return read_label_csv(p, classnames_file, limit_per_class=limit_per_class)
    return read_class_folder(p, classnames_file, limit_per_class=limit_per_class)


def _same_classes(train: LabelledImages, other: LabelledImages, what: str) -> None:
    only_train = sorted(set(train.keys) - set(other.keys))
    only_other = sorted(set(other.keys) - set(train.keys))
    if only_train or only_other:
        raise ClipcraftError(
            f"The class folders differ between train ({train.source}) and {what} ({other.source}): "
            f"only in train: {only_train[:10]}; only in {what}: {only_other[:10]}. Every split needs the same "
            "classes (one subfolder per class, same names)."
        )


def _subset(images: LabelledImages, index: np.ndarray, source: str) -> LabelledImages:
    return LabelledImages(
        [images.paths[i] for i in index], images.labels[index], images.keys, images.classnames, source
    )


def read_classification_data(
    train: str | os.PathLike[str],
    val: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    *,
    classnames_file: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    limit_per_class: int | None = None,
    seed: int = 0,
) -> ClassificationData:
    """Read and check the splits; only lists files, decodes nothing.

    Without ``val``, a stratified ``val_fraction`` of every training class (drawn with ``seed``, at least
    one image per class left for training) becomes the validation split. ``limit_per_class`` keeps the first
    N files of each class in every split, before the carving.

    Raises :class:`ClipcraftError` when a folder is missing or has no class subfolders, a class folder holds
    no image, the training data has fewer than two classes, the val or test classes differ from the
    training classes, or the carved validation split comes out empty.
    """
    train_set = read_labelled(train, classnames_file, limit_per_class)
    if train_set.num_classes < 2:
        raise ClipcraftError(
            f"{train_set.source} holds one class ({train_set.keys[0]!r}); a classifier needs at least two "
            "classes, one subfolder of images each."
        )
    if val is not None:
        val_set = read_labelled(val, classnames_file, limit_per_class)
        _same_classes(train_set, val_set, "val")
    else:
        train_idx, val_idx = stratified_split(train_set.labels, val_fraction, seed)
        if val_idx.size == 0:
            raise ClipcraftError(
                f"Carving {val_fraction:.0%} of {train_set.source} for validation leaves no validation image "
                f"({len(train_set)} training images in {train_set.num_classes} classes); raise val_fraction "
                "or give a validation folder with --val."
            )
        source = f"{train_set.source} (seed {seed} stratified {val_fraction:g} split)"
        val_set = _subset(train_set, val_idx, f"{source}, val part")
        train_set = _subset(train_set, train_idx, f"{source}, train part")
    test_set = None
    if test is not None:
        test_set = read_labelled(test, classnames_file, limit_per_class)
        _same_classes(train_set, test_set, "test")
    return ClassificationData(train_set, val_set, test_set)


# -- training images -----------------------------------------------------------------------------------------


class TrainImages:
    """Map-style dataset keyed by ``(index, epoch)`` -> ``(pixels (3, H, W) or None, label, error message)``.

    The transform runs under torch and Python RNGs seeded from (seed, epoch, index), so an image gets the same
    augmentation whichever worker loads it and whether or not the run was resumed. An image that fails to load
    comes back as ``None`` with the reason, to be skipped and counted, not fatal.
    """

    def __init__(self, images: LabelledImages, transform: Any, seed: int) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int, str]:
        import torch

        from clipcraft.images import load_image

        index, epoch = key
        label = int(self.images.labels[index])
        sample_seed = hash((self.seed, epoch, index)) % (2**63)
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                random.seed(sample_seed)
                return self.transform(load_image(self.images.paths[index])), label, ""
        except ImageLoadError as exc:
            return None, label, str(exc)
        except Exception as exc:  # decodable, but the transform cannot handle it: skip it, say why
            return (
                None,
                label,
                f"Could not preprocess {self.images.paths[index]}: {type(exc).__name__}: {exc}",
            )
        finally:
            random.setstate(py_state)


def collate_train(items: list[tuple[Any, int, str]]) -> tuple[Any, Any, list[str]]:
    """-> pixels (B_ok, 3, H, W) or None, labels (B_ok,) int64, error messages of the skipped images."""
    import torch

    ok = [(x, y) for x, y, err in items if not err]
    errors = [err for _, _, err in items if err]
    pixels = torch.stack([x for x, _ in ok]) if ok else None
    return pixels, torch.tensor([y for _, y in ok], dtype=torch.int64), errors


class EpochBatches:
    """Batches of ``(index, epoch)`` keys for one epoch: a permutation drawn from (seed, epoch), cut into
    ``batch_size`` chunks (the last may be smaller), starting at batch ``start``."""

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int, start: int = 0) -> None:
        self.order = np.random.default_rng([seed, epoch]).permutation(num_items)
        self.batch_size = batch_size
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return max(0, batches_per_epoch(len(self.order), self.batch_size) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.start, batches_per_epoch(len(self.order), self.batch_size)):
            chunk = self.order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(int(i), self.epoch) for i in chunk]


def batches_per_epoch(num_items: int, batch_size: int) -> int:
    """Steps in one epoch: every item once, the last batch possibly smaller."""
    return -(-num_items // batch_size)
