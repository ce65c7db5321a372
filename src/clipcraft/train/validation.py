"""Validation during training: retrieval recall (the evaluation package's metrics) and the loss on the
validation split, from one pass of embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from clipcraft.data import BadItem, CaptionDataset
from clipcraft.encoding import EncodeSettings, embed_features, encode_images, encode_texts, with_settings
from clipcraft.evaluation.retrieval import retrieval_metrics
from clipcraft.losses import clip_loss, siglip_loss
from clipcraft.model import ClipModel
from clipcraft.precision import Precision

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


@dataclass
class RetrievalEmbeddings:
    """Embeddings of a captioned split: images (N, D), captions (M, D), ``text_to_image`` (M,), the image
    paths of the N good images, and the images that could not be loaded."""

    images: np.ndarray
    texts: np.ndarray
    text_to_image: np.ndarray
    captions: list[str]
    paths: list[str]
    bad: list[BadItem] = field(default_factory=list)


@torch.no_grad()
def embed_split(
    model: ClipModel,
    dataset: CaptionDataset,
    *,
    batch_size: int,
    num_workers: int,
    precision: Precision,
    text_memo: dict[str, np.ndarray] | None = None,
    progress: bool = False,
) -> RetrievalEmbeddings:
    """Embeddings of every good image of ``dataset`` and all of its captions.

    ``text_memo``, when given and the text tower is fully locked, keeps the captions' tower features between
    calls (the tower cannot change), so validating every epoch runs the text tower once. ``progress``: bars
    on stderr.
    """
    settings = EncodeSettings(
        precision=precision,
        batch_size=batch_size,
        text_batch_size=batch_size * 4,
        workers=num_workers,
        progress=progress,
    )
    images = encode_images(model, [record.image for record in dataset.records], settings)
    good = images.kept
    captions: list[str] = []
    text_to_image: list[int] = []
    for new_index, i in enumerate(good):
        for caption in dataset.records[i].captions:
            captions.append(caption)
            text_to_image.append(new_index)
    if text_memo is not None and model.text_tower.fully_locked:
        key = f"{id(dataset)}:{len(captions)}"
        if key not in text_memo:
            features = with_settings(settings, output="features")
            text_memo[key] = encode_texts(model, captions, features).vectors
        text_emb = embed_features(model, text_memo[key], "text", precision)
    else:
        text_emb = encode_texts(model, captions, settings).vectors
    return RetrievalEmbeddings(
        images=images.vectors,
        texts=text_emb,
        text_to_image=np.asarray(text_to_image, dtype=np.int64),
        captions=captions,
        paths=[dataset.records[i].image for i in good],
        bad=images.failed,
    )


@torch.no_grad()
def validate_model(
    model: ClipModel,
    dataset: CaptionDataset,
    *,
    loss_name: str,
    loss_batch: int,
    batch_size: int,
    num_workers: int,
    precision: Precision,
    text_memo: dict[str, np.ndarray] | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], RetrievalEmbeddings]:
    """Retrieval metrics, their mean recall, and the validation loss (each image with its first caption, in
    batches of ``loss_batch`` like training); ``progress``: bars on stderr while embedding."""
    emb = embed_split(
        model,
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        text_memo=text_memo,
        progress=progress,
    )
    metrics = retrieval_metrics(emb.images, emb.texts, emb.text_to_image)
    first = np.searchsorted(emb.text_to_image, np.arange(len(emb.images)))  # first caption of each image
    scale, bias = model.logit_scale.exp().cpu(), model.logit_bias.cpu()
    losses = []
    for start in range(0, len(emb.images) - loss_batch + 1, loss_batch):
        img = torch.from_numpy(emb.images[start : start + loss_batch])
        txt = torch.from_numpy(emb.texts[first[start : start + loss_batch]])
        loss = clip_loss(img, txt, scale) if loss_name == "clip" else siglip_loss(img, txt, scale, bias)
        losses.append(float(loss))
    result = {k: float(v) for k, v in metrics.items()}
    result["recall_mean"] = float(np.mean([metrics[k] for k in RECALL_KEYS]))
    result["val_loss"] = float(np.mean(losses)) if losses else float("nan")
    result["num_images"] = len(emb.images)
    result["num_captions"] = len(emb.captions)
    result["num_skipped"] = len(emb.bad)
    return result, emb
