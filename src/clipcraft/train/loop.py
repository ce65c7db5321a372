"""The training loop, top to bottom in :func:`_train`. The device, processes and precision are set up once at
the start (:mod:`clipcraft.train.runtime`); seeding, resume, checkpoints, metrics, ``max_steps`` and progress
are the run helper's (:mod:`clipcraft.train.run`, shared with fine-tuning); everything else reads in the order
it happens."""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clipcraft.data import (
    BadDataReport,
    BadItem,
    CaptionDataset,
    CaptionGroupedBatchSampler,
    collate,
    detect_format,
    open_dataset,
    validate,
)
from clipcraft.data.text_augment import caption_variant, variant_choice
from clipcraft.errors import ClipcraftError
from clipcraft.losses import SimClrLoss, SlipLoss, build_loss
from clipcraft.model import ClipModel, ClipOutput, create_model, load
from clipcraft.train.checkpoint import load_checkpoint
from clipcraft.train.config import TrainConfig, tower_overrides
from clipcraft.train.ema import WeightAverage
from clipcraft.train.features import (
    CaptionFeatures,
    FeatureCache,
    build_or_load_cache,
    build_or_load_caption_cache,
)
from clipcraft.train.optim import build_optimizer, build_scheduler, loss_groups, param_groups
from clipcraft.train.run import Run, seed_everything
from clipcraft.train.runlog import RunLog
from clipcraft.train.runtime import Runtime, open_runtime
from clipcraft.train.text_variants import CaptionVariantCache, variant_dataset
from clipcraft.train.validation import validate_model

if TYPE_CHECKING:  # the webdataset library is an extra: imported where shards are streamed
    from clipcraft.data.webdataset import WebDatasetStream

SPLITS = {"flickr": ("train", "dev", "test"), "imagefolder": ("train", "validation", "test")}


@dataclass
class TrainResult:
    """Where a run put its outputs, and its final numbers."""

    run_dir: Path
    last_model: Path
    best_model: Path | None
    steps: int
    epochs: int
    metrics: dict[str, Any] = field(default_factory=dict)  # last validation (and test) metrics
    summary_path: Path | None = None


def train(config: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Train a model as ``config`` says; with ``resume``, continue the run in that directory exactly where
    its last checkpoint left it (model, optimizer, schedule, step, RNG and data order).

    Run under torchrun for distributed data parallel: each process trains on its shard of every global
    batch, the loss gathers embeddings from all ranks, and only rank 0 writes.
    """
    with open_runtime(config.run.device, config.run.precision) as runtime:
        return _train(config, runtime, resume)


def _train(config: TrainConfig, rt: Runtime, resume: str | Path | None) -> TrainResult:
    overrides = _model_overrides(config)  # a bad setting fails here, before the run directory is touched
    checkpoint = load_checkpoint(resume) if resume is not None else None
    run_dir = Path(resume) if resume is not None else Path(config.run.output_dir)
    run = Run(run_dir, rt, config.run, config.to_dict(), {"best": -math.inf}, checkpoint)
    log, state = run.log, run.state

    # -- model, seeded identically on every rank
    seed_everything(config.run.seed)
    model = _build_model(config, overrides).to(rt.device)
    if config.loss == "clip":
        model.logit_bias.requires_grad_(False)  # unused by the softmax loss (and DDP insists on used params)
    if not config.learn_logit_scale:
        model.logit_scale.requires_grad_(False)  # a fixed temperature
    _check_captions_per_image(config, model)

    # -- data: read, check before training, and open the validation split
    fmt = detect_format(config.data) if config.data_format is None else config.data_format
    train_split, val_split, test_split = _splits(config, fmt)
    _check_levers(config, model, fmt)
    epochs, batch_size, loader_config = config.optim.epochs, config.optim.batch_size, config.loader
    transform = model.image_transform(
        train=loader_config.augment, scale=loader_config.crop_scale, hflip=config.hflip
    )
    image_cache = index_map = None
    text_cache: FeatureCache | CaptionFeatures | CaptionVariantCache | None = None
    if fmt == "webdataset":  # streamed: no scan before training (bad samples are counted as they come)
        data: _MapBatches | _StreamBatches = _StreamBatches(config, model, transform, rt, checkpoint, log)
        text_cache = data.text_cache  # a locked text tower's features, keyed by caption
        report = BadDataReport(config.data)
        log.info(f"Training data: {data.stream!r}, {data.plan}")
    else:
        train_set = _open(config, config.data, train_split)
        report = validate(train_set, config.max_bad_fraction, check_images=config.check_images)  # type: ignore[arg-type]
        log.info(f"Training data: {train_set!r}\n{report.render()}")

        # -- features of locked towers whose input is not augmented: computed once, reused every epoch
        image_cache, text_cache, index_map = _feature_caches(config, model, train_set, rt, report, log)
        if index_map is not None:
            train_set = train_set.subset(index_map.tolist())
        sampler = CaptionGroupedBatchSampler(
            train_set, batch_size, seed=config.run.seed, num_replicas=rt.world_size, rank=rt.rank
        )
        items = _TrainItems(
            train_set,
            None if image_cache is not None else transform,
            seed=config.run.seed,
            views=SlipLoss.views if config.ssl_weight else 1,
            text_variants=0 if text_cache is not None else config.text_augment_variants,  # cached: rows
            text_strength=config.text_augment_strength,
        )
        loader = DataLoader(
            items,
            batch_sampler=_EpochKeys(sampler),
            collate_fn=_TrainCollate(None if text_cache is not None else model.tokenize),
            num_workers=loader_config.num_workers,
            persistent_workers=loader_config.num_workers > 0,  # no worker start-up at every epoch
            pin_memory=rt.device.type == "cuda",
            generator=torch.Generator().manual_seed(config.run.seed),  # keeps the main RNG for dropout only
        )
        data = _MapBatches(sampler, loader)
    val_set = _open(config, config.val_data or config.data, val_split) if val_split else None
    steps_per_epoch = data.steps
    total_steps = steps_per_epoch * epochs

    loss_fn = _build_loss(config, model, rt)
    groups = param_groups(model, config.learning_rates(), config.optim.weight_decay)
    groups += loss_groups(loss_fn, config.lr_heads, config.optim.weight_decay)  # SLIP's SimCLR head
    optimizer = build_optimizer(groups, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    load_report = BadDataReport(config.data)  # images that failed to decode while training
    ema = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        if config.ssl_weight:
            loss_fn.load_state_dict(checkpoint["loss"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        load_report = BadDataReport.from_dict(checkpoint["load_report"])
        run.restore()
    ddp_model: torch.nn.Module = model
    if rt.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )

    def training_state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "load_report": load_report.to_dict(),
            **({"ema": ema.state_dict()} if ema is not None else {}),
            **({"loss": loss_fn.state_dict()} if config.ssl_weight else {}),  # the SimCLR head
            **data.state(state["epoch"], state["batch"]),
        }

    def evaluated() -> contextlib.AbstractContextManager[None]:
        """What validation, the saved models and the test split see: the weight average, when there is one."""
        return ema.applied(model) if ema is not None else contextlib.nullcontext()

    # -- the loop
    metrics: dict[str, Any] = {}
    text_memo: dict[str, np.ndarray] = {}  # validation caption features of a locked text tower
    log.info(
        f"{total_steps} steps: {epochs} epochs x {steps_per_epoch} batches of {batch_size} x "
        f"{rt.world_size} process(es), precision {rt.precision}, loss {config.loss}"
    )
    while state["epoch"] < epochs and not run.out_of_steps():
        epoch = state["epoch"]
        model.train()
        bar = run.progress(steps_per_epoch, epochs)
        if isinstance(text_cache, CaptionVariantCache):
            text_cache.set_epoch(epoch)  # which caption variant each sample shows is drawn per epoch
        for batch, caption_indices in data.epoch(epoch, state["batch"]):
            load_report.record_batch(len(batch), batch.bad)
            size = rt.min_int(len(batch))  # every rank must gather the same number of rows
            state["batch"] += 1
            if size < 2:  # nothing to contrast against: skip the step (counted in the report)
                continue
            loss = _train_step(
                config, model, ddp_model, loss_fn, batch, caption_indices, size, image_cache, text_cache, index_map, rt
            )  # fmt: skip
            rt.average_gradients(loss_fn.parameters())  # DDP averages the model's; the loss's head is ours
            if config.optim.grad_clip_norm:
                trained = [*model.parameters(), *loss_fn.parameters()]
                torch.nn.utils.clip_grad_norm_(trained, config.optim.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale()
            if ema is not None:
                ema.update(model)
            run.step_done(size * rt.world_size)
            bar.update(1)
            if run.log_due():
                rate = run.samples_per_s()
                loss_value = rt.mean(float(loss))
                bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{rate:.1f}")
                log.metrics(
                    {
                        "type": "step",
                        "step": state["step"],
                        "epoch": epoch,
                        "loss": loss_value,
                        "logit_scale": model.logit_scale.exp().item(),
                        **({"ssl_loss": rt.mean(float(loss_fn.last_ssl))} if config.ssl_weight else {}),
                        "samples_per_s": rate,
                        **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
                    }
                )
            if run.out_of_steps():
                break
            if run.checkpoint_due():
                run.save_checkpoint(**training_state())
        bar.close()
        if run.out_of_steps() and state["batch"] < steps_per_epoch:
            run.stop_at_max_steps(**training_state())
            break
        run.end_epoch()
        with evaluated():
            metrics = _end_of_epoch(config, model, val_set, state, run_dir, rt, log, text_memo)
        run.save_checkpoint(**training_state())

    # -- the end: test split, plots, example sheet, summary
    result = TrainResult(
        run_dir=run_dir,
        last_model=run_dir / "last",
        best_model=(run_dir / "best") if (run_dir / "best").is_dir() else None,
        steps=state["step"],
        epochs=state["epoch"],
        metrics=metrics,
    )
    if rt.is_main and state["epoch"] >= epochs:
        with evaluated():
            result.metrics.update(_finish(config, model, test_split, result, report, load_report, log, rt))
    rt.barrier()
    return result


# -- one optimizer step -----------------------------------------------------------------------------------


def _train_step(
    config: TrainConfig,
    model: ClipModel,
    ddp_model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    batch: Any,
    caption_indices: torch.Tensor,
    size: int,
    image_cache: FeatureCache | None,
    text_cache: FeatureCache | CaptionFeatures | CaptionVariantCache | None,
    index_map: np.ndarray | None,
    rt: Runtime,
) -> torch.Tensor:
    """Forward, loss and backward for one batch (the first ``size`` pairs). With ``grad_accum_steps`` > 1 the
    batch runs as micro-batches but the loss is still the full-batch contrastive loss: every micro-batch's
    embeddings are first computed without gradient, then each micro-batch is recomputed with gradient and
    contrasted against the others' cached embeddings. With SLIP's self-supervision the images come as
    (B, 2, C, H, W) views and run as 2B image rows, rows 2i and 2i+1 the views of image i.

    ``caption_indices``: (B,) the first caption of each image (map-style data; ignored without a text cache),
    or (B, k) the rows of each image's k captions in a caption-keyed cache (streamed shards)."""
    device = model.device
    indices = batch.indices[:size]
    original = torch.from_numpy(index_map[indices.numpy()]) if index_map is not None else indices
    inputs: dict[str, Any] = {}
    if image_cache is not None:
        inputs["image_features"] = image_cache.rows(original).to(device)
    else:
        pixels = batch.images[:size].to(device, non_blocking=True)  # (B, C, H, W), or (B, V, C, H, W): views
        inputs["images"] = pixels.flatten(0, 1) if pixels.ndim == 5 else pixels
    captions = config.captions_per_image
    if isinstance(text_cache, CaptionFeatures):  # streamed: the collate looked up the rows of the captions
        inputs["text_features"] = text_cache.take(caption_indices[:size]).to(device)  # (B*k, F)
    elif text_cache is not None:
        features = text_cache.caption_rows(original, caption_indices[:size], captions)  # (B*k, F)
        inputs["text_features"] = features.to(device)
    else:
        inputs["texts"] = {k: v[:size].to(device) for k, v in batch.tokens.items()}

    accum = max(1, config.grad_accum_steps)
    if accum == 1:
        with rt.autocast():
            out = ddp_model(**inputs)
        loss = loss_fn(out)
        loss.backward()
        return loss.detach()

    chunks = [c for c in torch.arange(size).chunk(accum) if len(c)]
    views = SlipLoss.views if config.ssl_weight else 1
    parts = [_slice(inputs, c, captions, views) for c in chunks]
    with torch.no_grad(), rt.autocast():
        cached = [model(**p) for p in parts]
    images = [c.image_embeddings for c in cached]
    texts = [c.text_embeddings for c in cached]
    features = [c.image_features for c in cached]
    total = torch.zeros((), device=device)
    for j, part in enumerate(parts):
        sync = (
            contextlib.nullcontext() if (not rt.distributed or j == len(parts) - 1) else ddp_model.no_sync()
        )  # type: ignore[operator]
        with sync:
            with rt.autocast():
                out = ddp_model(**part)
            full = ClipOutput(
                image_embeddings=torch.cat(images[:j] + [out.image_embeddings] + images[j + 1 :]),
                text_embeddings=torch.cat(texts[:j] + [out.text_embeddings] + texts[j + 1 :]),
                logit_scale=out.logit_scale,
                logit_bias=out.logit_bias,
                image_features=torch.cat(features[:j] + [out.image_features] + features[j + 1 :]),
            )
            loss = loss_fn(full)
            loss.backward()
            total = loss.detach()
    # the loss's own parameters (temperature, bias, SimCLR head) met every row in every micro-step: each
    # micro-step added the full-batch gradient
    for param in (model.logit_scale, model.logit_bias, *loss_fn.parameters()):
        if param.grad is not None:
            param.grad /= len(parts)
    return total


def _slice(inputs: dict[str, Any], rows: torch.Tensor, captions: int, views: int = 1) -> dict[str, Any]:
    """The model inputs of image rows ``rows``; cached text features hold ``captions`` rows per image, and
    images ``views`` rows per image."""
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            out[key] = {k: v[rows] for k, v in value.items()}
        elif key == "text_features":
            out[key] = value[(rows[:, None] * captions + torch.arange(captions)).reshape(-1)]
        elif key == "images":
            out[key] = value[(rows[:, None] * views + torch.arange(views)).reshape(-1)]
        else:
            out[key] = value[rows]
    return out


# -- data -------------------------------------------------------------------------------------------------


class _TrainItems(Dataset):
    """Training pairs keyed by ``(image, caption, epoch)``. Augmentation is seeded from (seed, epoch, image),
    so the same sample gets the same crop whichever worker loads it: a resumed run sees exactly the data an
    uninterrupted one would. Without a transform (cached image features) images are not even read.

    ``views`` > 1 (SLIP): the image is a (views, C, H, W) stack of crops of the decoded image, view 0 seeded
    as the single view is and view v from (seed, epoch, image, v). ``text_variants`` > 0: the caption is
    the original or one of its variants, as :mod:`clipcraft.data.text_augment` draws them."""

    def __init__(
        self,
        dataset: CaptionDataset,
        transform: Any,
        seed: int,
        views: int = 1,
        text_variants: int = 0,
        text_strength: float = 0.0,
    ) -> None:
        several = transform is not None and views > 1  # then the transform runs here, once per view
        self.dataset = (
            dataset.with_transforms(transform) if transform is not None and not several else dataset
        )
        self.transform = transform if several else None
        self.load_images = transform is not None
        self.seed, self.views = seed, views
        self.text_variants, self.text_strength = text_variants, text_strength

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[Any, str, int, int] | BadItem:
        index, caption_index, epoch = key
        if not self.load_images:
            caption = self.dataset.records[index].captions[caption_index]
            return (None, self._caption(caption, epoch, index, caption_index), index, caption_index)
        sample_seed = hash((self.seed, epoch, index)) % (2**63)
        item = _seeded(sample_seed, self.dataset.__getitem__, (index, caption_index))
        if isinstance(item, BadItem):
            return item
        image = item.image
        if self.transform is not None:  # view 0 gets the crop a one-view run gets; view v > 0 its own
            seeds = [sample_seed] + [
                hash((self.seed, epoch, index, v)) % (2**63) for v in range(1, self.views)
            ]
            image = torch.stack([_seeded(seed, self.transform, image) for seed in seeds])  # (views, C, H, W)
        return (image, self._caption(item.caption, epoch, index, caption_index), item.index, caption_index)

    def _caption(self, caption: str, epoch: int, index: int, caption_index: int) -> str:
        if not self.text_variants:
            return caption
        variant = int(variant_choice(self.seed, epoch, index, caption_index, self.text_variants))
        return caption_variant(caption, variant, self.text_strength, self.seed)


def _seeded(seed: int, fn: Any, arg: Any) -> Any:
    """``fn(arg)`` with torch's and Python's global generators seeded by ``seed``, both restored after."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        out = fn(arg)
    random.setstate(py_state)
    return out


class _TrainCollate:
    """:func:`clipcraft.data.collate` plus the caption index of every kept pair (for cached text features)."""

    def __init__(self, tokenize: Any) -> None:
        self.tokenize = tokenize

    def __call__(self, items: list[Any]) -> tuple[Any, torch.Tensor]:
        batch = collate(items, self.tokenize)
        caption_indices = torch.tensor(
            [it[3] for it in items if not isinstance(it, BadItem)], dtype=torch.int64
        )
        return batch, caption_indices


class _MapBatches:
    """One epoch of the map-style loader: the grouped sampler's batches from ``start_batch`` on."""

    def __init__(self, sampler: CaptionGroupedBatchSampler, loader: DataLoader) -> None:
        self.sampler, self.loader = sampler, loader
        self.steps = sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int) -> Any:
        self.sampler.set_epoch(epoch, start_batch=start_batch)
        return self.loader

    def state(self, epoch: int, batch: int) -> dict[str, Any]:
        return {}  # the sampler is a function of (seed, epoch, batch), which the run state holds


class _StreamBatches:
    """One epoch of streamed shards (:class:`~clipcraft.data.webdataset.ShardBatches`): ``steps`` batches
    on every rank, in order, from ``start_batch`` on. The checkpoint holds the stream state (seed, epoch,
    samples seen, ranks and workers); a resume with another split is refused.

    A locked text tower (with ``feature_cache``) is cached like map-style data's, but keyed by caption text
    (:class:`~clipcraft.train.features.CaptionFeatures`, built before the first epoch from one pass over the
    shards' captions): then the stream yields each image's ``captions_per_image`` captions, the collate looks
    up their rows, and no step runs the text tower. A locked image tower runs every step (no image cache)."""

    def __init__(
        self,
        config: TrainConfig,
        model: ClipModel,
        transform: Any,
        rt: Runtime,
        checkpoint: Any,
        log: RunLog,
    ) -> None:
        from clipcraft.data.webdataset import (
            ShardBatches,
            StreamPlan,
            WebDatasetStream,
            shard_manifest_samples,
        )

        cache_text = "text" in _cached_towers(config, model)
        samples = config.train_num_samples or shard_manifest_samples(config.data)
        if not samples:
            raise ClipcraftError(
                f"How many samples make an epoch of the WebDataset shards {config.data}? No manifest.json from "
                "`clipcraft data shards` lists them all: set train_num_samples=N (all ranks)."
            )
        steps = samples // (config.optim.batch_size * rt.world_size)
        if steps < 1:
            raise ClipcraftError(
                f"train_num_samples={samples} does not fill one global batch of {config.optim.batch_size} x "
                f"{rt.world_size} process(es)."
            )
        stream = WebDatasetStream(
            config.data,
            transform=transform,
            shuffle=True,
            shuffle_buffer=config.shuffle_buffer,
            seed=config.run.seed,
            rank=0 if config.stream_deterministic else rt.rank,  # deterministic: all read all
            world_size=1 if config.stream_deterministic else rt.world_size,
            step_captions=config.captions_per_image if cache_text else None,
        )
        self.plan = StreamPlan(
            steps=steps,
            batch_size=config.optim.batch_size,
            world_size=rt.world_size,
            num_workers=config.loader.num_workers,
            resampled=config.resampled,
            seed=config.run.seed,
            deterministic=config.stream_deterministic,
            rank=rt.rank,
        )
        if checkpoint is not None:
            self.plan.check_resume(checkpoint.get("stream"))
        self.stream = stream
        self.batches = ShardBatches(stream, self.plan, weights=_weights(config.data_weights))
        self.text_cache = _stream_text_cache(config, model, stream, rt, log) if cache_text else None
        self.loader = DataLoader(
            self.batches,
            batch_size=None,  # ShardBatches yields whole batches
            collate_fn=_StreamCollate(model.tokenize, self.text_cache, config.captions_per_image),
            num_workers=config.loader.num_workers,
            pin_memory=rt.device.type == "cuda",
            generator=torch.Generator().manual_seed(config.run.seed),  # workers' seeds: not from the main RNG
        )
        self.steps = steps

    def epoch(self, epoch: int, start_batch: int) -> Iterator[Any]:
        from clipcraft.data.webdataset import in_order

        self.batches.set_epoch(epoch, start_batch)  # reaches the workers: they start with each epoch
        return in_order(iter(self.loader), start_batch)

    def state(self, epoch: int, batch: int) -> dict[str, Any]:
        return {"stream": self.plan.state(epoch, batch)}


def _weights(value: Any) -> list[float] | None:
    """``data_weights`` as floats: a list, or the command line's ``1,3``."""
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        return [float(w) for w in items]
    except (TypeError, ValueError):
        raise ClipcraftError(f"data_weights must be numbers, one per '::' source; got {value!r}.") from None


class _StreamCollate:
    """:func:`clipcraft.data.collate` of one streamed batch ``(number, items)``; the number travels along.

    Without a text cache the captions are tokenized (one per image; the caption indices are zeros). With one,
    the items are :class:`~clipcraft.data.webdataset.StreamItem` with ``captions`` (k) captions each: nothing
    is tokenized and the second part is the (B, k) rows of the kept images' captions in the cache (a caption
    missing from it raises, naming the sample)."""

    def __init__(self, tokenize: Any, text_cache: CaptionFeatures | None = None, captions: int = 1) -> None:
        self.tokenize = tokenize
        self.text_cache = text_cache
        self.captions = captions

    def __call__(self, numbered: tuple[int, list[Any]]) -> tuple[int, tuple[Any, torch.Tensor]]:
        number, items = numbered
        if self.text_cache is None:
            batch = collate(items, self.tokenize)
            return number, (batch, torch.zeros(len(batch), dtype=torch.int64))  # one caption per image
        batch = collate(items)
        good = [it for it in items if not isinstance(it, BadItem)]
        texts = [c for it in good for c in it.captions]
        rows = self.text_cache.rows(texts, [it.where for it in good for _ in it.captions])
        return number, (batch, torch.from_numpy(rows).reshape(len(good), self.captions))  # (B, k)


class _EpochKeys:
    """The grouped sampler's batches with the epoch attached to every key."""

    def __init__(self, sampler: CaptionGroupedBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(i, j, epoch) for i, j in batch]

    def __len__(self) -> int:
        return len(self.sampler)


# -- set-up helpers -----------------------------------------------------------------------------------------


def _model_overrides(config: TrainConfig) -> dict[str, Any]:
    """The ModelConfig overrides of this run: ``model_overrides`` plus the tower fields, which own locking
    and gradient checkpointing (see :func:`clipcraft.train.config.tower_overrides`)."""
    if config.patch_dropout and config.lock_image and config.image_unlocked_groups == 0:
        raise ClipcraftError(
            "patch_dropout speeds up and regularises training of the image tower; with lock_image=true "
            "and no unlocked groups there is nothing of it to train. Set patch_dropout=0."
        )
    return tower_overrides(
        config.model_overrides,
        lock_image=config.lock_image,
        image_unlocked_groups=config.image_unlocked_groups,
        lock_text=config.lock_text,
        text_unlocked_groups=config.text_unlocked_groups,
        grad_checkpointing=config.grad_checkpointing,
    )


def _build_model(config: TrainConfig, overrides: dict[str, Any]) -> ClipModel:
    if config.init:  # an existing model, saved or imported (clipcraft.load dispatches on the source)
        if config.image_checkpoint or config.pretrained is not None:
            raise ClipcraftError(
                "init= starts from a whole existing model: drop pretrained and image_checkpoint."
            )
        model = load(config.init, overrides=overrides)
    elif Path(config.model).is_dir():
        model = load(config.model, overrides=overrides)
    else:
        model = create_model(
            config.model,
            pretrained=config.pretrained,
            image_checkpoint=config.image_checkpoint,
            overrides=overrides,
        )
    if config.patch_dropout:
        model.image_tower.set_patch_dropout(config.patch_dropout)  # checks the range and the tower kind
    if config.channels_last:
        model.image_tower.set_channels_last(True)
    return model


def _check_captions_per_image(config: TrainConfig, model: ClipModel) -> None:
    """Several captions per step come from the text feature cache: refuse before any work otherwise."""
    k = config.captions_per_image
    if k < 1:
        raise ClipcraftError(f"captions_per_image must be at least 1, got {k}.")
    if k > 1 and not (model.text_tower.fully_locked and config.feature_cache):
        raise ClipcraftError(
            f"captions_per_image={k} needs cached text features: set lock_text=true (and keep "
            "feature_cache=true), or use captions_per_image=1."
        )


def _check_levers(config: TrainConfig, model: ClipModel, fmt: str) -> None:
    """SLIP's self-supervision and caption augmentation: refuse settings they cannot honour, before any
    work."""
    if config.ssl_weight < 0:
        raise ClipcraftError(f"ssl_weight must be >= 0 (0: off), got {config.ssl_weight}.")
    if config.ssl_weight > 0:
        if config.ssl_temperature <= 0 or min(config.ssl_hidden, config.ssl_dim) < 1:
            raise ClipcraftError(
                f"ssl_temperature must be > 0 and ssl_hidden, ssl_dim >= 1; got {config.ssl_temperature}, "
                f"{config.ssl_hidden}, {config.ssl_dim}."
            )
        if model.image_tower.fully_locked:
            raise ClipcraftError(
                "ssl_weight > 0 self-supervises the image tower, but lock_image=true with no unlocked groups "
                "leaves nothing of it to train (and its features may come from the cache, with no image pass "
                "at all). Set image_unlocked_groups=N, lock_image=false, or ssl_weight=0."
            )
        if not config.loader.augment:
            raise ClipcraftError(
                "ssl_weight > 0 contrasts two random crops of each image; with augment=false both views are "
                "the same centre crop. Set augment=true or ssl_weight=0."
            )
    if config.text_augment_variants < 0:
        raise ClipcraftError(
            f"text_augment_variants must be >= 0 (0: off), got {config.text_augment_variants}."
        )
    if config.text_augment_variants > 0 and not 0 < config.text_augment_strength <= 1:
        raise ClipcraftError(
            f"text_augment_strength is the fraction of words each variant edits, in (0, 1]; got "
            f"{config.text_augment_strength}."
        )
    if fmt == "webdataset" and (config.ssl_weight or config.text_augment_variants):
        raise ClipcraftError(
            "ssl_weight and text_augment_variants work with map-style data (Flickr, CSV/JSONL, COCO, image "
            "folders), not with streamed WebDataset shards yet: set them to 0 or train from a map-style dataset."
        )


def _build_loss(config: TrainConfig, model: ClipModel, rt: Runtime) -> torch.nn.Module:
    """The run's loss on the device: CLIP or SigLIP, wrapped with SLIP's SimCLR term when ``ssl_weight`` > 0
    (its projection head is built here, from the seeded global generator)."""
    loss = build_loss(config.loss, distributed=rt.distributed, label_smoothing=config.label_smoothing)
    if not config.ssl_weight:
        return loss
    ssl = SimClrLoss(
        model.image_tower.num_features,
        hidden=config.ssl_hidden,
        dim=config.ssl_dim,
        temperature=config.ssl_temperature,
        distributed=rt.distributed,  # negatives from every rank, as the contrastive loss's
    )
    return SlipLoss(loss, ssl, config.ssl_weight).to(rt.device)


def _splits(config: TrainConfig, fmt: str) -> tuple[str, str | None, str | None]:
    """(train, validation, test) split names for this format; ``auto`` picks the format's own names."""
    train_name, val_name, test_name = SPLITS.get(fmt, ("all", None, None))
    if fmt == "imagefolder":  # split folders are optional there
        from clipcraft.data.imagefolder import imagefolder_splits

        found = imagefolder_splits(Path(config.data))
        val_name = val_name if val_name in found else None
        test_name = test_name if test_name in found else None
    train_split = train_name if config.train_split == "auto" else config.train_split
    if config.val_split == "auto":
        val_split = val_name if config.val_data is None else "all"
    else:
        val_split = config.val_split
    return train_split, val_split, test_name


def _open(config: TrainConfig, path: str, split: str) -> CaptionDataset:
    dataset = open_dataset(path, config.data_format, split, **config.data_options)
    if not isinstance(dataset, CaptionDataset):
        raise ClipcraftError(
            f"{path} is a WebDataset stream; this training loop needs a map-style dataset (Flickr, CSV/JSONL, "
            "COCO or an image folder) so batches can be grouped by image."
        )
    return dataset


def _feature_caches(
    config: TrainConfig,
    model: ClipModel,
    dataset: CaptionDataset,
    rt: Runtime,
    report: BadDataReport,
    log: RunLog,
) -> tuple[FeatureCache | None, FeatureCache | CaptionVariantCache | None, np.ndarray | None]:
    """Caches for locked towers (image: only when training images are not augmented; text: with its caption
    variants when ``text_augment_variants`` > 0). Rank 0 computes, the others wait and then read. Images that
    failed to load are dropped: the returned ``index_map`` maps the kept images to their rows in the
    caches."""
    cache_dir = _cache_dir(config)
    caches: dict[str, FeatureCache] = {}
    for tower in _cached_towers(config, model):
        with _main_rank_first(rt):
            cache, bad, reused = build_or_load_cache(
                model,
                dataset,
                tower,
                cache_dir,
                batch_size=config.loader.eval_batch_size,
                num_workers=config.loader.num_workers,
                precision=rt.precision,
                progress=rt.is_main,
            )
        for item in bad:
            report.add(item.kind, item.where, item.reason, rows=len(dataset.records[item.index].captions))
        caches[tower] = cache
        log.info(f"{tower} features {'read from' if reused else 'cached in'} {cache_dir}")
    image_cache, text_cache = caches.get("image"), caches.get("text")
    if text_cache is not None and config.text_augment_variants:
        text_cache = _caption_variants(config, model, dataset, text_cache, cache_dir, rt, log)
    if image_cache is None and text_cache is None:
        return None, None, None
    keep = np.flatnonzero(image_cache.ok) if image_cache is not None else np.arange(len(dataset))
    return image_cache, text_cache, keep


def _stream_text_cache(
    config: TrainConfig, model: ClipModel, stream: WebDatasetStream, rt: Runtime, log: RunLog
) -> CaptionFeatures:
    """The caption-keyed cache of a locked text tower for the shards of ``stream`` (all of them, whatever
    the rank). Rank 0 builds it, the others wait and then read it."""
    with _main_rank_first(rt):
        cache, reused = build_or_load_caption_cache(
            model,
            stream,
            _cache_dir(config),
            batch_size=config.loader.eval_batch_size,
            num_workers=config.loader.num_workers,
            precision=rt.precision,
            progress=rt.is_main,
        )
    log.info(
        f"text features of {len(cache.keys)} captions {'read from' if reused else 'cached in'} {cache.folder}"
    )
    return cache


def _cached_towers(config: TrainConfig, model: ClipModel) -> list[str]:
    """The towers whose features are computed once and cached (with ``feature_cache``): a locked text tower,
    and a locked image tower whose training images are not augmented."""
    if not config.feature_cache:
        return []
    towers = ["image"] if model.image_tower.fully_locked and not config.loader.augment else []
    return towers + (["text"] if model.text_tower.fully_locked else [])


def _cache_dir(config: TrainConfig) -> Path:
    return Path(config.cache_dir) if config.cache_dir else Path(config.run.output_dir) / "feature-cache"


@contextlib.contextmanager
def _main_rank_first(rt: Runtime) -> Iterator[None]:
    """Run the block on rank 0 first (it writes a cache), then on the other ranks (they read it)."""
    if not rt.is_main:
        rt.barrier()
    yield
    if rt.is_main:
        rt.barrier()


def _caption_variants(
    config: TrainConfig,
    model: ClipModel,
    dataset: CaptionDataset,
    originals: FeatureCache,
    cache_dir: Path,
    rt: Runtime,
    log: RunLog,
) -> CaptionVariantCache:
    """The text cache of the original captions plus one cache per caption variant, each keyed (as any text
    cache) on the captions it holds, so a run with other variants never reads these. Rank 0 computes."""
    caches = [originals]
    for variant in range(1, config.text_augment_variants + 1):
        captions = variant_dataset(dataset, variant, config.text_augment_strength, config.run.seed)
        with _main_rank_first(rt):
            cache, _, reused = build_or_load_cache(
                model,
                captions,
                "text",
                cache_dir,
                batch_size=config.loader.eval_batch_size,
                num_workers=config.loader.num_workers,
                precision=rt.precision,
                progress=rt.is_main,
            )
        caches.append(cache)
        log.info(
            f"text features of caption variant {variant} {'read from' if reused else 'cached in'} {cache_dir}"
        )
    return CaptionVariantCache(caches, config.run.seed)


# -- end of epoch and end of run -------------------------------------------------------------------------------


def _end_of_epoch(
    config: TrainConfig,
    model: ClipModel,
    val_set: CaptionDataset | None,
    state: dict[str, Any],
    run_dir: Path,
    rt: Runtime,
    log: RunLog,
    text_memo: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Validate, log, and write the ``last`` and ``best`` models (rank 0; the others wait)."""
    metrics: dict[str, Any] = {}
    if rt.is_main:
        if val_set is not None:
            log.info(f"epoch {state['epoch']}: validating on {len(val_set.records)} images")
            metrics, _ = validate_model(
                model,
                val_set,
                loss_name=config.loss,
                loss_batch=config.optim.batch_size * rt.world_size,
                batch_size=config.loader.eval_batch_size,
                num_workers=config.loader.num_workers,
                precision=rt.precision,
                text_memo=text_memo,
                progress=True,
            )
        log.metrics({"type": "epoch", "epoch": state["epoch"], "step": state["step"], **metrics})
        model.save(run_dir / "last")
        score = metrics.get("recall_mean", -metrics.get("val_loss", 0.0))
        if val_set is None or score > state["best"]:
            state["best"] = score
            model.save(run_dir / "best")
        if metrics:
            log.info(
                f"epoch {state['epoch']}: val loss {metrics['val_loss']:.4f}, i2t R@1 {metrics['i2t_r1']:.3f}, "
                f"t2i R@1 {metrics['t2i_r1']:.3f}, mean recall {metrics['recall_mean']:.3f}"
            )
    rt.barrier()
    return metrics


def _finish(
    config: TrainConfig,
    model: ClipModel,
    test_split: str | None,
    result: TrainResult,
    report: BadDataReport,
    load_report: BadDataReport,
    log: RunLog,
    rt: Runtime,
) -> dict[str, Any]:
    """Test-split retrieval with the best model (reloaded onto the run's device), plots, the example sheet
    and ``summary.json``."""
    from clipcraft.train import plots

    out: dict[str, Any] = {}
    best = load(result.best_model, device=rt.device) if result.best_model is not None else model
    test_emb = None
    if test_split is not None:
        test_set = _open(config, config.data, test_split)
        log.info(f"testing the best model on {len(test_set.records)} images ({test_split})")
        test_metrics, test_emb = validate_model(
            best,
            test_set,
            loss_name=config.loss,
            loss_batch=config.optim.batch_size,
            batch_size=config.loader.eval_batch_size,
            num_workers=config.loader.num_workers,
            precision=rt.precision,
            progress=True,
        )
        out.update({f"test_{k}": v for k, v in test_metrics.items()})
        log.info(
            f"test ({test_split}, {test_metrics['num_images']} images): i2t R@1/5/10 "
            f"{test_metrics['i2t_r1']:.3f}/{test_metrics['i2t_r5']:.3f}/{test_metrics['i2t_r10']:.3f}, t2i R@1/5/10 "
            f"{test_metrics['t2i_r1']:.3f}/{test_metrics['t2i_r5']:.3f}/{test_metrics['t2i_r10']:.3f}"
        )
    figures = plots.training_plots(result.run_dir / "metrics.jsonl", result.run_dir)
    if config.example_sheet and test_emb is not None:
        figures.append(plots.retrieval_sheet(test_emb, result.run_dir / "retrieval_examples.png"))
    summary = {
        "run_dir": str(result.run_dir),
        "steps": result.steps,
        "epochs": result.epochs,
        "last_model": str(result.last_model),
        "best_model": str(result.best_model) if result.best_model else None,
        **rt.record(),  # the device and the precision that ran (and the one asked for)
        "final_validation": result.metrics,
        **out,
        "bad_data": {"before_training": report.to_dict(), "while_training": load_report.to_dict()},
        "figures": [str(f) for f in figures if f is not None],
    }
    result.summary_path = result.run_dir / "summary.json"
    result.summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    from clipcraft.interop.card import write_card

    for model_dir in (result.last_model, result.best_model):
        if model_dir is not None and Path(model_dir).is_dir():
            write_card(model_dir, result.run_dir)  # now with the run's test metrics
    log.info(f"Summary: {result.summary_path}; models: {result.last_model}, {result.best_model}")
    return out
