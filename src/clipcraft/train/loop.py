"""The training loop, top to bottom in :func:`train`. Distributed, precision and device handling are set
up once at the start; everything else reads in the order it happens."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clipcraft.config import TrainConfig
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
from clipcraft.errors import ClipcraftError
from clipcraft.losses import build_loss
from clipcraft.model import ClipModel, ClipOutput, create_model, load
from clipcraft.precision import autocast, resolve_precision
from clipcraft.train.checkpoint import (
    CHECKPOINT_FILE,
    atomic_torch_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from clipcraft.train.distributed import Dist, setup, teardown
from clipcraft.train.features import FeatureCache, build_or_load_cache
from clipcraft.train.optim import build_optimizer, build_scheduler
from clipcraft.train.runlog import RunLog
from clipcraft.train.validation import validate_model

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
    dist = setup(config.device)
    try:
        return _train(config, dist, resume)
    finally:
        teardown(dist)


def _train(config: TrainConfig, dist: Dist, resume: str | Path | None) -> TrainResult:
    checkpoint = load_checkpoint(resume) if resume is not None else None
    run_dir = Path(resume) if resume is not None else Path(config.output_dir)
    log = RunLog(run_dir, dist.is_main, resume_step=checkpoint["state"]["step"] if checkpoint else None)
    log.write_config(config)

    # -- model, seeded identically on every rank
    _seed_everything(config.seed)
    model = _build_model(config).to(dist.device)
    if config.loss == "clip":
        model.logit_bias.requires_grad_(False)  # unused by the softmax loss (and DDP insists on used params)
    precision = resolve_precision(config.precision, dist.device)
    _check_captions_per_image(config, model)

    # -- data: read, check before training, and open the validation split
    fmt = detect_format(config.data) if config.data_format is None else config.data_format
    train_split, val_split, test_split = _splits(config, fmt)
    train_set = _open(config, config.data, train_split)
    report = validate(train_set, config.max_bad_fraction, check_images=config.check_images)  # type: ignore[arg-type]
    log.info(f"Training data: {train_set!r}\n{report.render()}")
    val_set = _open(config, config.val_data or config.data, val_split) if val_split else None

    # -- features of locked towers whose input is not augmented: computed once, reused every epoch
    image_cache, text_cache, index_map = _feature_caches(
        config, model, train_set, dist, precision, report, log
    )
    if index_map is not None:
        train_set = train_set.subset(index_map.tolist())

    sampler = CaptionGroupedBatchSampler(
        train_set, config.batch_size, seed=config.seed, num_replicas=dist.world_size, rank=dist.rank
    )
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = steps_per_epoch * config.epochs
    items = _TrainItems(
        train_set,
        transform=None
        if image_cache is not None
        else model.image_transform(train=config.augment, scale=config.crop_scale, hflip=config.hflip),
        seed=config.seed,
    )
    loader = DataLoader(
        items,
        batch_sampler=_EpochKeys(sampler),
        collate_fn=_TrainCollate(None if text_cache is not None else model.tokenize),
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,  # no worker start-up at every epoch
        pin_memory=dist.device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # keeps the main RNG for dropout only
    )

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    state = {"step": 0, "epoch": 0, "batch": 0, "best": -math.inf}
    load_report = BadDataReport(train_set.source)  # images that failed to decode while training
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state.update(checkpoint["state"])
        load_report = BadDataReport.from_dict(checkpoint["load_report"])
        set_rng_state(checkpoint["rng"])
        log.info(
            f"Resumed {run_dir} at step {state['step']} (epoch {state['epoch']}, batch {state['batch']})."
        )
    ddp_model: torch.nn.Module = model
    if dist.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    loss_fn = build_loss(config.loss, distributed=dist.enabled)

    def save_checkpoint() -> None:
        if dist.is_main:
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": dict(state),
                    "rng": rng_state(),
                    "load_report": load_report.to_dict(),
                    "config": config.to_dict(),
                },
                run_dir / CHECKPOINT_FILE,
            )
        dist.barrier()

    # -- the loop
    metrics: dict[str, Any] = {}
    text_memo: dict[str, np.ndarray] = {}  # validation caption features of a locked text tower
    stop = False
    log.info(
        f"{total_steps} steps: {config.epochs} epochs x {steps_per_epoch} batches of {config.batch_size} x "
        f"{dist.world_size} process(es), precision {precision}, loss {config.loss}"
    )
    while state["epoch"] < config.epochs and not stop:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, start_batch=state["batch"])
        model.train()
        bar = log.progress(
            total=steps_per_epoch, initial=state["batch"], desc=f"epoch {epoch + 1}/{config.epochs}"
        )
        tick, window_samples = time.perf_counter(), 0
        for batch, caption_indices in loader:
            load_report.record_batch(len(batch), batch.bad)
            size = dist.min_int(len(batch))  # every rank must gather the same number of rows
            state["batch"] += 1
            if size < 2:  # nothing to contrast against: skip the step (counted in the report)
                continue
            loss = _train_step(
                config, model, ddp_model, loss_fn, batch, caption_indices, size, image_cache, text_cache, index_map,
                precision, dist,
            )  # fmt: skip
            if config.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale()
            state["step"] += 1
            window_samples += size * dist.world_size
            bar.update(1)
            if state["step"] % config.log_every == 0 or state["step"] == 1:
                seconds = time.perf_counter() - tick
                rate = window_samples / max(seconds, 1e-9)
                tick, window_samples = time.perf_counter(), 0
                loss_value = dist.mean(float(loss))
                bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{rate:.1f}")
                log.metrics(
                    {
                        "type": "step",
                        "step": state["step"],
                        "epoch": epoch,
                        "loss": loss_value,
                        "logit_scale": model.logit_scale.exp().item(),
                        "samples_per_s": rate,
                        **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
                    }
                )
            if config.max_steps is not None and state["step"] >= config.max_steps:
                stop = True
                break
            if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                save_checkpoint()
        bar.close()
        if stop and state["batch"] < steps_per_epoch:
            save_checkpoint()
            log.info(f"Stopped at max_steps={config.max_steps}; resume with --resume {run_dir}")
            break
        state["epoch"] += 1
        state["batch"] = 0
        metrics = _end_of_epoch(config, model, val_set, state, run_dir, dist, log, precision, text_memo)
        save_checkpoint()

    # -- the end: test split, plots, example sheet, summary
    result = TrainResult(
        run_dir=run_dir,
        last_model=run_dir / "last",
        best_model=(run_dir / "best") if (run_dir / "best").is_dir() else None,
        steps=state["step"],
        epochs=state["epoch"],
        metrics=metrics,
    )
    if dist.is_main and state["epoch"] >= config.epochs:
        result.metrics.update(_finish(config, model, test_split, result, report, load_report, log, precision))
    dist.barrier()
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
    text_cache: FeatureCache | None,
    index_map: np.ndarray | None,
    precision: str,
    dist: Dist,
) -> torch.Tensor:
    """Forward, loss and backward for one batch (the first ``size`` pairs). With ``grad_accum_steps`` > 1 the
    batch runs as micro-batches but the loss is still the full-batch contrastive loss: every micro-batch's
    embeddings are first computed without gradient, then each micro-batch is recomputed with gradient and
    contrasted against the others' cached embeddings."""
    device = model.device
    indices = batch.indices[:size]
    original = torch.from_numpy(index_map[indices.numpy()]) if index_map is not None else indices
    inputs: dict[str, Any] = {}
    if image_cache is not None:
        inputs["image_features"] = image_cache.rows(original).to(device)
    else:
        inputs["images"] = batch.images[:size].to(device, non_blocking=True)
    captions = config.captions_per_image
    if text_cache is not None:
        features = text_cache.caption_rows(original, caption_indices[:size], captions)
        inputs["text_features"] = features.to(device)
    else:
        inputs["texts"] = {k: v[:size].to(device) for k, v in batch.tokens.items()}

    accum = max(1, config.grad_accum_steps)
    if accum == 1:
        with autocast(device, precision):
            out = ddp_model(**inputs)
        loss = loss_fn(out)
        loss.backward()
        return loss.detach()

    chunks = [c for c in torch.arange(size).chunk(accum) if len(c)]
    parts = [_slice(inputs, c, captions) for c in chunks]
    with torch.no_grad(), autocast(device, precision):
        cached = [model(**p) for p in parts]
    images = [c.image_embeddings for c in cached]
    texts = [c.text_embeddings for c in cached]
    total = torch.zeros((), device=device)
    for j, part in enumerate(parts):
        sync = contextlib.nullcontext() if (not dist.enabled or j == len(parts) - 1) else ddp_model.no_sync()  # type: ignore[operator]
        with sync:
            with autocast(device, precision):
                out = ddp_model(**part)
            full = ClipOutput(
                image_embeddings=torch.cat(images[:j] + [out.image_embeddings] + images[j + 1 :]),
                text_embeddings=torch.cat(texts[:j] + [out.text_embeddings] + texts[j + 1 :]),
                logit_scale=out.logit_scale,
                logit_bias=out.logit_bias,
            )
            loss = loss_fn(full)
            loss.backward()
            total = loss.detach()
    for param in (model.logit_scale, model.logit_bias):  # each micro-step added the full-batch gradient
        if param.grad is not None:
            param.grad /= len(parts)
    return total


def _slice(inputs: dict[str, Any], rows: torch.Tensor, captions: int) -> dict[str, Any]:
    """The model inputs of image rows ``rows``; cached text features hold ``captions`` rows per image."""
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            out[key] = {k: v[rows] for k, v in value.items()}
        elif key == "text_features":
            out[key] = value[(rows[:, None] * captions + torch.arange(captions)).reshape(-1)]
        else:
            out[key] = value[rows]
    return out


# -- data -------------------------------------------------------------------------------------------------


class _TrainItems(Dataset):
    """Training pairs keyed by ``(image, caption, epoch)``. Augmentation is seeded from (seed, epoch, image),
    so the same sample gets the same crop whichever worker loads it: a resumed run sees exactly the data an
    uninterrupted one would. Without a transform (cached image features) images are not even read."""

    def __init__(self, dataset: CaptionDataset, transform: Any, seed: int) -> None:
        self.dataset = dataset.with_transforms(transform) if transform is not None else dataset
        self.load_images = transform is not None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[Any, str, int, int] | BadItem:
        index, caption_index, epoch = key
        if not self.load_images:
            return (None, self.dataset.records[index].captions[caption_index], index, caption_index)
        sample_seed = hash((self.seed, epoch, index)) % (2**63)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            item = self.dataset[index, caption_index]
        random.setstate(py_state)
        if isinstance(item, BadItem):
            return item
        return (item.image, item.caption, item.index, caption_index)


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_model(config: TrainConfig) -> ClipModel:
    if config.patch_dropout and config.lock_image and config.image_unlocked_groups == 0:
        raise ClipcraftError(
            "patch_dropout speeds up and regularises training of the image tower; with lock_image=true "
            "and no unlocked groups there is nothing of it to train. Set patch_dropout=0."
        )
    overrides: dict[str, Any] = dict(config.model_overrides)
    overrides.update(
        {
            "image.lock": config.lock_image,
            "image.unlocked_groups": config.image_unlocked_groups,
            "text.lock": config.lock_text,
            "text.unlocked_groups": config.text_unlocked_groups,
            "image.grad_checkpointing": config.grad_checkpointing,
            "text.grad_checkpointing": config.grad_checkpointing,
        }
    )
    if Path(config.model).is_dir():
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
    dist: Dist,
    precision: str,
    report: BadDataReport,
    log: RunLog,
) -> tuple[FeatureCache | None, FeatureCache | None, np.ndarray | None]:
    """Caches for locked towers (image: only when training images are not augmented). Rank 0 computes,
    the others wait and then read. Images that failed to load are dropped: the returned ``index_map`` maps
    the kept images to their rows in the caches."""
    if not config.feature_cache:
        return None, None, None
    cache_dir = Path(config.cache_dir) if config.cache_dir else Path(config.output_dir) / "feature-cache"
    wanted = []
    if model.image_tower.fully_locked and not config.augment:
        wanted.append("image")
    if model.text_tower.fully_locked:
        wanted.append("text")
    caches: dict[str, FeatureCache] = {}
    for tower in wanted:
        if not dist.is_main:
            dist.barrier()  # rank 0 writes the cache first
        cache, bad, reused = build_or_load_cache(
            model,
            dataset,
            tower,
            cache_dir,
            batch_size=config.eval_batch_size,
            num_workers=config.num_workers,
            precision=precision,
            progress=dist.is_main,
        )
        if dist.is_main:
            dist.barrier()
        for item in bad:
            report.add(item.kind, item.where, item.reason, rows=len(dataset.records[item.index].captions))
        caches[tower] = cache
        log.info(f"{tower} features {'read from' if reused else 'cached in'} {cache_dir}")
    image_cache, text_cache = caches.get("image"), caches.get("text")
    if image_cache is None and text_cache is None:
        return None, None, None
    keep = np.flatnonzero(image_cache.ok) if image_cache is not None else np.arange(len(dataset))
    return image_cache, text_cache, keep


# -- end of epoch and end of run -------------------------------------------------------------------------------


def _end_of_epoch(
    config: TrainConfig,
    model: ClipModel,
    val_set: CaptionDataset | None,
    state: dict[str, Any],
    run_dir: Path,
    dist: Dist,
    log: RunLog,
    precision: str,
    text_memo: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Validate, log, and write the ``last`` and ``best`` models (rank 0; the others wait)."""
    metrics: dict[str, Any] = {}
    if dist.is_main:
        if val_set is not None:
            metrics, _ = validate_model(
                model,
                val_set,
                loss_name=config.loss,
                loss_batch=config.batch_size * dist.world_size,
                batch_size=config.eval_batch_size,
                num_workers=config.num_workers,
                precision=precision,
                text_memo=text_memo,
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
    dist.barrier()
    return metrics


def _finish(
    config: TrainConfig,
    model: ClipModel,
    test_split: str | None,
    result: TrainResult,
    report: BadDataReport,
    load_report: BadDataReport,
    log: RunLog,
    precision: str,
) -> dict[str, Any]:
    """Test-split retrieval with the best model, plots, the example sheet and ``summary.json``."""
    from clipcraft.train import plots

    out: dict[str, Any] = {}
    best = load(result.best_model) if result.best_model is not None else model
    test_emb = None
    if test_split is not None:
        test_set = _open(config, config.data, test_split)
        test_metrics, test_emb = validate_model(
            best,
            test_set,
            loss_name=config.loss,
            loss_batch=config.batch_size,
            batch_size=config.eval_batch_size,
            num_workers=config.num_workers,
            precision=precision,
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
        "final_validation": result.metrics,
        **out,
        "bad_data": {"before_training": report.to_dict(), "while_training": load_report.to_dict()},
        "figures": [str(f) for f in figures if f is not None],
    }
    result.summary_path = result.run_dir / "summary.json"
    result.summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log.info(f"Summary: {result.summary_path}; models: {result.last_model}, {result.best_model}")
    return out
