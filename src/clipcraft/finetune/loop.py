"""Fine-tuning a classifier from the zero-shot head, top to bottom in :func:`finetune`.

The order of events: check the config and the data (every error before any work), load the model and build
the zero-shot head, validate at step 0 (zero-shot accuracy), train the image tower and head with the
training job's pieces (the runtime, the run helper for seeding, resume, atomic checkpoints, metrics,
max_steps and progress, AdamW parameter groups, warmup + cosine schedule), validate every epoch and stop early, then mix the best
fine-tuned weights with the zero-shot ones over a grid of alphas (WiSE-FT), keep the mix that validates
best, score the test split and save the result as a model directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from clipcraft.errors import ClipcraftError
from clipcraft.evaluation.labelled import LabelledImages
from clipcraft.finetune.classifier import CLASSIFIER_JSON, ImageClassifier
from clipcraft.finetune.config import FinetuneConfig, check_alphas
from clipcraft.finetune.data import (
    ClassificationData,
    EpochBatches,
    TrainImages,
    batches_per_epoch,
    collate_train,
    read_classification_data,
)
from clipcraft.finetune.wise import best_alpha, interpolate_weights
from clipcraft.precision import as_precision
from clipcraft.train.checkpoint import CHECKPOINT_FILE, atomic_torch_save, load_checkpoint
from clipcraft.train.config import tower_overrides
from clipcraft.train.optim import build_optimizer as adamw
from clipcraft.train.optim import build_scheduler, param_groups
from clipcraft.train.run import Run, seed_everything
from clipcraft.train.runtime import single_process_runtime

BEST_WEIGHTS = "best-finetuned.pt"  # the fine-tuned weights of the best validation epoch (alpha = 1)
SUMMARY_FILE = "summary.json"
EVAL_KEYS = ("top1", "top5", "mean_per_class_recall", "loss", "num_images", "num_skipped")


@dataclass
class FinetuneResult:
    """What a run did. ``finished`` is False when it stopped at ``max_steps`` (resume it to go on); only a
    finished run has the classifier saved in ``output_dir`` and a ``summary`` (also in ``summary.json``)."""

    output_dir: Path
    finished: bool
    steps: int
    epochs: int
    summary: dict[str, Any] = field(default_factory=dict)


def evaluate_classifier(
    classifier: ImageClassifier,
    images: LabelledImages,
    *,
    batch_size: int = 64,
    precision: str = "fp32",
    workers: int = 0,
) -> dict[str, float]:
    """Classify every image of ``images`` (eval transform, no gradients) and score it.

    Returns :data:`EVAL_KEYS`: top-1/top-5 accuracy and mean per-class recall (fractions; see
    :func:`~clipcraft.evaluation.metrics.classification_metrics`), mean cross-entropy ``loss`` in nats, and
    ``num_images`` scored and ``num_skipped`` (files that failed to decode). Raises :class:`ClipcraftError`
    when no image decodes.
    """
    from clipcraft.encoding import EncodeSettings, encode_images
    from clipcraft.evaluation.metrics import classification_metrics

    settings = EncodeSettings(precision=as_precision(precision), batch_size=batch_size, workers=workers)
    emb = encode_images(classifier.model, images.paths, settings)
    if emb.vectors.shape[0] == 0:
        raise ClipcraftError(f"None of the {len(images)} images of {images.source} could be decoded.")
    logits = classifier.logits(emb.vectors).astype(np.float64)  # (N_ok, C)
    labels = images.labels[emb.kept]  # (N_ok,)
    metrics = classification_metrics(logits, labels)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (N_ok, C)
    return {
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "mean_per_class_recall": metrics["mean_per_class_recall"],
        "loss": float(-log_probs[np.arange(labels.size), labels].mean()),
        "num_images": int(labels.size),
        "num_skipped": emb.num_skipped,
    }


def build_optimizer(classifier: ImageClassifier, config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`clipcraft.train.optim.param_groups`: the image tower and its projection head at
    ``lr_tower``, the classifier head at ``lr_head``; weight decay on matrices only. Frozen parameters (the
    text side; the image tower with ``lock_image``) are left out. FLYP (text side at ``lr_text``) and
    layer-wise decay take their groups from :func:`clipcraft.finetune.adapt.adapt_param_groups`."""
    if config.method != "ce" or config.layer_decay != 1.0:
        from clipcraft.finetune.adapt import adapt_param_groups

        return adamw(adapt_param_groups(classifier, config), config.optim)
    decay = config.optim.weight_decay
    encoder = param_groups(
        classifier.model, {"image_tower": config.lr_tower, "heads": config.lr_tower}, decay
    )
    head = param_groups(classifier.head, {"heads": config.lr_head}, decay)
    groups = [{**g, "name": g["name"].replace("heads", "image_head")} for g in encoder]
    groups += [{**g, "name": g["name"].replace("heads", "classifier")} for g in head]
    return adamw(groups, config.optim)


def finetune(config: FinetuneConfig, resume: str | os.PathLike[str] | None = None) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.train`` into ``config.output_dir``; with ``resume``, continue
    the run in that directory exactly where its last checkpoint left it (weights, optimizer, schedule,
    step, early-stopping state, RNG and data order), under ``config`` (e.g. a larger ``max_steps``).

    The output directory ends up holding the classifier (see :mod:`clipcraft.finetune.classifier`: a model
    directory :func:`clipcraft.load` reads, plus the head), the run's ``metrics.jsonl``, ``config.yaml``,
    ``checkpoint.pt``, ``best-finetuned.pt`` and ``summary.json``.

    Raises :class:`ClipcraftError` before any work for a bad config (e.g. an alpha outside [0, 1]), missing
    or bad data (one class only, an empty class folder, val/test classes that differ from train's), a
    missing model, an output directory that already holds a run (without ``overwrite``) or a finished run
    to resume.
    """
    start_time = time.perf_counter()
    config.check()
    flyp = config.method == "flyp"
    lock = {"lock_image": config.lock_image, **({"lock_text": False} if flyp else {})}
    overrides = tower_overrides(**lock)  # the training job's owner of tower locking
    checkpoint = load_checkpoint(resume) if resume is not None else None
    run_dir = Path(resume) if resume is not None else Path(config.run.output_dir)
    if (
        checkpoint is not None
        and (run_dir / SUMMARY_FILE).is_file()
        and (run_dir / CLASSIFIER_JSON).is_file()
    ):
        raise ClipcraftError(f"{run_dir} holds a finished fine-tuning run; there is nothing to resume.")
    data = read_classification_data(
        config.train,
        config.val,
        config.test,
        classnames_file=config.classnames_file,
        val_fraction=config.val_fraction,
        limit_per_class=config.limit_per_class,
        seed=config.run.seed,
    )
    templates = None
    if config.templates_file is not None:
        from clipcraft.evaluation.zeroshot import load_templates

        templates = load_templates(config.templates_file)
    from clipcraft.interop import is_foreign_source

    if not Path(config.model).is_dir() and not is_foreign_source(config.model):
        raise ClipcraftError(f"Model directory not found: {config.model}")
    if checkpoint is None:
        _prepare_output(run_dir, config)

    # -- set up once: the runtime (device, precision), the run, the model with its zero-shot head
    from clipcraft.model import load

    rt = single_process_runtime(config.run.device, config.run.precision)
    device, precision = rt.device, rt.precision
    job_state = {
        "best_epoch": 0,  # 0: the zero-shot head validated best so far
        "best_val": None,
        "zeroshot_val": None,
        "bad_epochs": 0,  # epochs since the last improvement
        "stopped_early": False,
        "skipped": 0,  # training images that failed to load
    }
    run = Run(run_dir, rt, config.run, config.to_dict(), job_state, checkpoint)
    log, state = run.log, run.state
    seed_everything(config.run.seed)
    model = load(config.model, device=device, overrides=overrides)
    classifier = ImageClassifier.from_zeroshot(model, data.classnames, templates, data.keys)
    # FLYP, LoRA: weight-space ensembling mixes whole models (both towers, heads), so keep the initial one
    whole_model = flyp or config.lora_rank > 0
    initial_full = {k: v.detach().clone() for k, v in classifier.state_dict().items()} if whole_model else {}
    if flyp:
        classifier.trainable_prefixes = ("model.", "head.")
        classifier.head.requires_grad_(False)  # the classifier is the text tower's class embeddings
        for module in (model.text_tower, model.text_head):
            module.requires_grad_(True)
        model.logit_scale.requires_grad_(True)
    lora_settings = None
    if config.lora_rank:
        from clipcraft.finetune.lora import LoraSettings, add_lora

        lora_settings = LoraSettings(
            config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_towers, config.lora_targets
        )
        add_lora(model, lora_settings)
        if flyp:  # adapters replace the towers' own weights; heads and temperature still train
            for name, param in model.named_parameters():
                if name.startswith(("image_tower.", "text_tower.")):
                    param.requires_grad_("lora_" in name)
    zeroshot_state = {k: v.detach().clone() for k, v in classifier.trainable_state().items()}

    def evaluate(images: LabelledImages) -> dict[str, float]:
        if flyp:
            from clipcraft.finetune.adapt import refresh_head

            refresh_head(classifier)
        return evaluate_classifier(
            classifier,
            images,
            batch_size=config.loader.eval_batch_size,
            precision=precision,
            workers=config.loader.num_workers,
        )

    epochs, batch_size = config.optim.epochs, config.optim.batch_size
    steps_per_epoch = batches_per_epoch(len(data.train), batch_size)
    optimizer = build_optimizer(classifier, config)
    scheduler = build_scheduler(optimizer, config.optim, steps_per_epoch * epochs)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if checkpoint is not None:
        classifier.load_trainable_state(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        run.restore()
    else:
        state["zeroshot_val"] = state["best_val"] = evaluate(data.val)
        log.metrics({"type": "val", "step": 0, "epoch": 0, **_prefixed(state["zeroshot_val"], "val_")})
        log.info(f"step 0, zero-shot head: val top-1 {state['zeroshot_val']['top1']:.4f}")

    def training_state() -> dict[str, Any]:
        return {
            "model": classifier.trainable_state(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }

    # -- the loop
    loader_config = config.loader
    augment = (
        model.image_transform(train=True, scale=tuple(loader_config.crop_scale))
        if loader_config.augment
        else None
    )
    items = TrainImages(data.train, augment or model.image_transform(train=False), config.run.seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    if flyp:
        from clipcraft.finetune.adapt import class_prompts, flyp_step_logits
        from clipcraft.losses import build_loss

        contrastive = build_loss("clip")
    trainable_params = sum(p.numel() for p in params)
    total_params = sum(p.numel() for p in classifier.parameters())
    log.info(
        f"{len(data.train)} training images in {len(data.keys)} classes, {len(data.val)} for validation; "
        f"up to {epochs} epochs x {steps_per_epoch} steps of {batch_size}, precision {precision}"
    )
    while state["epoch"] < epochs and not state["stopped_early"] and not run.out_of_steps():
        epoch = state["epoch"]
        loader = DataLoader(
            items,  # type: ignore[arg-type]
            batch_sampler=EpochBatches(len(items), batch_size, config.run.seed, epoch, state["batch"]),
            collate_fn=collate_train,
            num_workers=loader_config.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(config.run.seed),  # leaves the main RNG to dropout alone
        )
        classifier.train()
        bar = run.progress(steps_per_epoch, epochs)
        seen, correct, loss_sum, loss_count = 0, 0, 0.0, 0
        for pixels, labels, errors in loader:
            state["batch"] += 1
            bar.update(1)
            for message in errors[: max(0, 5 - state["skipped"])]:  # name the first few, count them all
                log.info(f"skipped: {message}")
            state["skipped"] += len(errors)
            if pixels is None:
                continue
            pixels, labels = pixels.to(device, non_blocking=True), labels.to(device)
            if flyp:  # each image against its class prompt, CLIP loss; accuracy: the caption it picks
                captions = class_prompts(
                    labels,
                    classifier.classnames,
                    classifier.templates,
                    config.run.seed * 7919 + state["step"],
                )
                with rt.autocast():
                    loss, pair_logits = flyp_step_logits(model, pixels, captions, contrastive)  # (B, B)
                logits = torch.nn.functional.one_hot(labels[pair_logits.argmax(dim=1)], len(data.keys))
            else:
                with rt.autocast():
                    logits = classifier(pixels)  # (B, C)
                loss = loss_fn(logits.float(), labels)
            loss.backward()
            if config.optim.grad_clip_norm:
                nn.utils.clip_grad_norm_(params, config.optim.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if flyp:
                model.clamp_logit_scale()
            run.step_done(labels.numel())
            seen += labels.numel()
            correct += int((logits.detach().argmax(dim=1) == labels).sum())
            loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
            if run.log_due():
                rate = run.samples_per_s()
                bar.set_postfix(loss=f"{loss_sum / loss_count:.3f}", img_s=f"{rate:.1f}")
                log.metrics(
                    {
                        "type": "step",
                        "step": state["step"],
                        "epoch": epoch,
                        "loss": loss_sum / loss_count,
                        "train_top1": correct / max(seen, 1),
                        "samples_per_s": rate,
                        **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
                    }
                )
                seen, correct, loss_sum, loss_count = 0, 0, 0.0, 0
            if run.out_of_steps():
                break
            if run.checkpoint_due():
                run.save_checkpoint(**training_state())
        bar.close()
        if run.out_of_steps() and state["batch"] < steps_per_epoch:
            break  # mid-epoch: checkpointed below, no validation
        run.end_epoch()
        val = evaluate(data.val)
        if val["top1"] > state["best_val"]["top1"]:
            state.update(best_epoch=state["epoch"], best_val=val, bad_epochs=0)
            atomic_torch_save(classifier.trainable_state(), run_dir / BEST_WEIGHTS)
        else:
            state["bad_epochs"] += 1
            state["stopped_early"] = 0 < config.patience <= state["bad_epochs"]
        log.metrics({"type": "val", "step": state["step"], "epoch": state["epoch"], **_prefixed(val, "val_")})
        log.info(
            f"epoch {state['epoch']}: val top-1 {val['top1']:.4f}, loss {val['loss']:.4f} (best "
            f"{state['best_val']['top1']:.4f} at epoch {state['best_epoch']})"
            + (f"; no gain in {state['bad_epochs']} epochs, stopping" if state["stopped_early"] else "")
        )
        run.save_checkpoint(**training_state())
    training_done = state["epoch"] >= epochs or state["stopped_early"]
    if not training_done:
        run.stop_at_max_steps(**training_state())
        return FinetuneResult(run_dir, False, state["step"], state["epoch"])

    # -- weight-space ensembling on val, the test split, the saved classifier
    if state["best_epoch"] == 0:
        finetuned_state = zeroshot_state  # fine-tuning never beat the zero-shot head on val
    else:
        finetuned_state = torch.load(run_dir / BEST_WEIGHTS, map_location=device, weights_only=True)
    known = {0.0: state["zeroshot_val"], 1.0: state["best_val"]}
    if whole_model:
        # mix whole models: the initial one and the fine-tuned one (LoRA merged into plain weights first)
        classifier.load_trainable_state(finetuned_state)
        if lora_settings is not None:
            from clipcraft.finetune.lora import ADAPTER_DIR, merge_lora, save_adapters

            save_adapters(model, run_dir / ADAPTER_DIR, lora_settings)
            merge_lora(model)
            known = {0.0: state["zeroshot_val"]}  # merged weights differ from the adapter model by rounding
        if flyp:
            from clipcraft.finetune.adapt import refresh_head

            refresh_head(classifier)
        finetuned_full = {k: v.detach().clone() for k, v in classifier.state_dict().items()}

        def load_mix(alpha: float) -> None:
            with torch.no_grad():
                classifier.load_state_dict(interpolate_weights(initial_full, finetuned_full, alpha))

    else:

        def load_mix(alpha: float) -> None:
            classifier.load_trainable_state(interpolate_weights(zeroshot_state, finetuned_state, alpha))

    rows = []
    for a in check_alphas(config.alphas):
        if a not in known:
            load_mix(a)
        rows.append({"alpha": a, **(known[a] if a in known else evaluate(data.val))})
    if config.wise_keep is not None:
        _score_retention_on_val(rows, model, load_mix, config, precision)
        alpha = best_alpha([r for r in rows if r["retention_val_kept"] >= config.wise_keep])
    else:
        alpha = best_alpha(rows)
    for row in rows:
        log.metrics({"type": "wise", "step": state["step"], "alpha": row["alpha"], **_prefixed(row, "val_")})
    log.info(
        "WiSE-FT on val: "
        + ", ".join(
            f"alpha {r['alpha']:g}: {r['top1']:.4f}"
            + (f" (retention kept {r['retention_val_kept']:.1%})" if "retention_val_kept" in r else "")
            for r in rows
        )
    )
    test = _test(data, alpha, load_mix, evaluate)
    for name, metrics in test.items():
        log.metrics({"type": "test", "step": state["step"], "model": name, **_prefixed(metrics, "test_")})
    retention = {}
    if config.retention:
        from clipcraft.finetune.adapt import measure_retention

        for name, a in (("initial", 0.0), ("finetuned", 1.0), ("wise", alpha)):
            load_mix(a)
            retention[name] = measure_retention(
                model, config.retention, config.retention_split, config.retention_limit, precision,
                config.loader.eval_batch_size,
            )  # fmt: skip
            log.info(
                f"retention ({retention[name]['kind']}) of the {name} model: {retention[name]['score']:.4f}"
            )
        base = retention["initial"]["score"]
        for name in ("finetuned", "wise"):
            retention[name]["kept"] = retention[name]["score"] / base if base > 0 else float("nan")
    load_mix(alpha)
    if flyp:
        refresh_head(classifier)
    chosen = next(r for r in rows if r["alpha"] == alpha)
    info = {
        "alpha": alpha,
        "val_top1": chosen["top1"],
        "source_model": str(config.model),
        "best_epoch": state["best_epoch"],
        "method": config.method,
        "lora": None if lora_settings is None else dataclasses.asdict(lora_settings),
    }
    classifier.save(run_dir, info=info)
    summary = {
        "output_dir": str(run_dir),
        "model": str(config.model),
        "data": data.describe(),
        **rt.record(),  # the device and the precision that ran (and the one asked for)
        "steps": state["step"],
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "stopped_early": state["stopped_early"],
        "num_skipped_train_images": state["skipped"],
        "val": {"zeroshot": state["zeroshot_val"], "finetuned": state["best_val"], "wise": chosen},
        "wise": rows,
        "alpha": alpha,
        "test": test,
        "method": config.method,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "lora": info["lora"],
        "retention": retention,
        "seconds_this_session": round(time.perf_counter() - start_time, 1),
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    from clipcraft.interop.card import write_card

    write_card(run_dir, run_dir)  # the card names the recipe and the test metrics of this run
    log.info(
        f"Chose alpha {alpha:g} (val top-1 {chosen['top1']:.4f}; zero-shot {state['zeroshot_val']['top1']:.4f}, "
        f"fine-tuned {state['best_val']['top1']:.4f})"
        + (f"; test top-1 {test['wise']['top1']:.4f}" if test else "")
        + f". Saved the classifier to {run_dir}"
    )
    return FinetuneResult(run_dir, True, state["step"], state["epoch"], summary)


def _score_retention_on_val(
    rows: list[dict[str, Any]], model: Any, load_mix: Any, config: FinetuneConfig, precision: Any
) -> None:
    """Add ``retention_val`` (the retention score on ``config.retention_val_split``) and ``retention_val_kept``
    (its share of alpha 0's, the initial model's) to every WiSE-FT row; ``load_mix(a)`` loads a mixture."""
    from clipcraft.finetune.adapt import measure_retention

    for row in rows:
        load_mix(row["alpha"])
        row["retention_val"] = measure_retention(
            model, config.retention, config.retention_val_split, config.retention_limit, precision,
            config.loader.eval_batch_size,
        )["score"]  # fmt: skip
    base = next(r["retention_val"] for r in rows if r["alpha"] == 0.0)  # the initial model (checked present)
    for row in rows:
        row["retention_val_kept"] = row["retention_val"] / base if base > 0 else 1.0  # nothing to lose


def _test(
    data: ClassificationData, alpha: float, load_mix: Any, evaluate: Any
) -> dict[str, dict[str, float]]:
    """Test metrics of the zero-shot (alpha 0), fine-tuned (alpha 1) and chosen (``wise``) weights;
    ``load_mix(a)`` puts the mixture at ``a`` into the classifier."""
    if data.test is None:
        return {}
    by_alpha: dict[float, dict[str, float]] = {}
    for a in (0.0, 1.0, alpha):
        if a not in by_alpha:
            load_mix(a)
            by_alpha[a] = evaluate(data.test)
    return {
        "zeroshot": by_alpha[0.0],
        "finetuned": by_alpha[1.0],
        "wise": {"alpha": alpha, **by_alpha[alpha]},
    }


def _prepare_output(run_dir: Path, config: FinetuneConfig) -> None:
    """Refuse to write over the source model or, without ``overwrite``, over an earlier run or model."""
    if Path(config.model).resolve() == run_dir.resolve():
        raise ClipcraftError(
            f"The output directory {run_dir} is the model being fine-tuned; choose another --output-dir."
        )
    earlier = [
        n
        for n in (CHECKPOINT_FILE, CLASSIFIER_JSON, "config.json", "metrics.jsonl")
        if (run_dir / n).exists()
    ]
    if earlier and not config.overwrite:
        raise ClipcraftError(
            f"{run_dir} already holds a run or a model ({', '.join(earlier)}). Continue it with --resume "
            f"{run_dir}, replace it with --overwrite, or choose another --output-dir."
        )
    for name in (CHECKPOINT_FILE, BEST_WEIGHTS, SUMMARY_FILE, CLASSIFIER_JSON):
        (run_dir / name).unlink(missing_ok=True)  # so an interrupted new run never mixes with the old one


def _prefixed(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in metrics.items() if k in EVAL_KEYS}
