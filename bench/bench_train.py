"""Training-step throughput and peak memory: clipcraft's seed architecture vs open_clip, side by side, on CPU.

Both models: the same timm trunk (``vit_base_patch16_224``, random weights, CLS pooling) and the same
transformers MPNet-base text tower built from ``clipcraft.presets.MPNET_BASE`` (no hub), mean pooling. Heads
differ (negligible FLOPs): clipcraft uses its MLP heads (768->512->512 + LayerNorm) on both towers, open_clip a
bias-free linear image projection and its MLP text projection (768->640->512). open_clip's HF text-tower table
has no MPNet entry, so MPNet is registered in it as RoBERTa-like with mean pooling.

One step = forward of both towers on a batch (224x224 images, captions of 12-20 tokens padded to the batch
maximum), CLIP loss, backward, AdamW step (same settings for both). Timed steps alternate between the two
models (A B B A ...) so that load from other jobs on the shared CPU hits both alike; figures are medians.
Peak memory is measured for each model in its own subprocess (VmHWM of /proc/self/status) so the two do
not pollute each other.

    .venv/bin/python bench/bench_train.py            # batch 16, bf16, 2 warm-up + 5 timed steps each
    .venv/bin/python bench/bench_train.py --quick    # batch 2, 1 warm-up + 2 timed steps each
    .venv/bin/python bench/bench_train.py --lit      # image tower locked (LiT), epochs after the first

With ``--lit`` the image tower is frozen in both. clipcraft then runs it once per image and trains from its
cached features (the first step, a warm-up, fills the cache, as the first epoch does in ``clipcraft train``);
open_clip (``lock_image_tower()``, as ``--lock-image`` does) runs the frozen tower forward on every step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

LIBS = ("clipcraft", "open_clip")
ADAMW = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)  # the same for both models


# ----------------------------------------------------------------------------------------------------------
# models


def build_clipcraft(lit: bool = False) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    import clipcraft
    from clipcraft.losses import clip_loss

    model = clipcraft.create_model("seed", pretrained=False, overrides={"image.lock": lit}).train()
    cache: dict[int, torch.Tensor] = {}  # LiT: the feature cache (one batch here), filled on first sight

    def loss_fn(images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        texts = {"input_ids": ids, "attention_mask": mask}
        if not lit:
            out = model(images, texts)
        else:
            if id(images) not in cache:
                with torch.no_grad():
                    cache[id(images)] = model.image_tower(images).float()
            out = model(image_features=cache[id(images)], texts=texts)
        return clip_loss(out.image_embeddings, out.text_embeddings, out.logit_scale)

    return model, loss_fn


def build_open_clip(lit: bool = False) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    import open_clip
    from open_clip import hf_configs, hf_model
    from open_clip import model as oc_model
    from transformers import AutoConfig

    from clipcraft.presets import MPNET_BASE

    # open_clip's HF table has no MPNet: register it as RoBERTa-like (same attribute names) with mean pooling
    hf_configs.arch_dict.setdefault("mpnet", dict(hf_configs.arch_dict["roberta"], pooler="mean_pooler"))
    arch = dict(MPNET_BASE)
    hf_config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    # HFTextEncoder calls AutoConfig.from_pretrained(name) unless given a config: give it the local one
    original = oc_model.HFTextEncoder
    oc_model.HFTextEncoder = functools.partial(hf_model.HFTextEncoder, config=hf_config)
    try:
        model = open_clip.CustomTextCLIP(
            embed_dim=512,
            vision_cfg=open_clip.CLIPVisionCfg(
                timm_model_name="vit_base_patch16_224",
                timm_model_pretrained=False,
                timm_pool="",  # keep the trunk's own (CLS token) pooling, as clipcraft's tower does
                timm_proj="linear",
                image_size=224,
            ),
            text_cfg=open_clip.CLIPTextCfg(
                hf_model_name="sentence-transformers/all-mpnet-base-v2",
                hf_model_pretrained=False,
                hf_proj_type="mlp",
                hf_pooler_type="mean_pooler",
            ),
        ).train()
    finally:
        oc_model.HFTextEncoder = original
    if lit:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    loss = open_clip.ClipLoss()

    def loss_fn(images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image_emb, text_emb, scale = model(images, ids)  # its mask is ids != pad id: the same as ``mask``
        return loss(image_emb, text_emb, scale)

    return model, loss_fn


BUILDERS = {"clipcraft": build_clipcraft, "open_clip": build_open_clip}


def make_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, 224, 224) and MPNet-style token ids / mask (B, L): <s> ... </s>, 12-20 tokens, pad id 1."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 224, 224, generator=gen)
    lengths = torch.randint(12, 21, (batch,), generator=gen)
    length = int(lengths.max())
    ids = torch.full((batch, length), 1, dtype=torch.long)  # pad
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(5, 30527, (n,), generator=gen)
        ids[i, 0], ids[i, n - 1] = 0, 2  # <s>, </s>
        mask[i, :n] = 1
    return images, ids, mask


class Trainer:
    """One model, its loss and its AdamW; ``step()`` runs one training step and returns its seconds."""

    def __init__(self, lib: str, precision: str, fused: bool, lit: bool = False) -> None:
        torch.manual_seed(0)
        self.model, self.loss_fn = BUILDERS[lib](lit)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, **ADAMW, **({"fused": True} if fused else {}))
        self.precision = precision

    def step(self, batch: tuple[torch.Tensor, ...]) -> float:
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with autocast:
            loss = self.loss_fn(*batch)
        loss.backward()
        self.opt.step()
        seconds = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        return seconds


# ----------------------------------------------------------------------------------------------------------
# measurements


def vm_hwm_mib() -> float:
    """Peak resident memory of this process so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure_memory(lib: str, args: argparse.Namespace) -> dict[str, float]:
    """Runs in a fresh subprocess: peak RSS after building, and after ``args.memory_steps`` training steps."""
    batch = make_batch(args.batch)
    trainer = Trainer(lib, args.precision, args.fused, args.lit)
    built = vm_hwm_mib()
    for _ in range(args.memory_steps):
        trainer.step(batch)
    peak = vm_hwm_mib()
    return {
        "peak_rss_mib": round(peak, 1),
        "after_build_mib": round(built, 1),
        "training_mib": round(peak - built, 1),
    }


def memory_in_subprocess(lib: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-child", lib, "--batch", str(args.batch)]
    cmd += [
        "--precision",
        args.precision,
        "--memory-steps",
        str(args.memory_steps),
        "--threads",
        str(args.threads),
    ]
    cmd += ["--fused"] if args.fused else []
    cmd += ["--lit"] if args.lit else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_speed(args: argparse.Namespace) -> dict[str, list[float]]:
    """Interleaved steps: warm-ups, then timed steps in A B B A order; returns seconds per timed step."""
    batch = make_batch(args.batch)
    trainers = {lib: Trainer(lib, args.precision, args.fused, args.lit) for lib in args.libs}
    for i in range(args.warmup):
        for lib in trainers:
            print(f"  warm-up {i + 1}/{args.warmup} {lib}: {trainers[lib].step(batch):.1f}s", flush=True)
    times: dict[str, list[float]] = {lib: [] for lib in trainers}
    order = list(trainers)
    for i in range(args.steps):
        for lib in order if i % 2 == 0 else order[::-1]:
            times[lib].append(trainers[lib].step(batch))
            print(f"  step {i + 1}/{args.steps} {lib}: {times[lib][-1]:.1f}s", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for lib, trainer in trainers.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer.step(batch)
            print(f"\nprofile of one {lib} step (top ops by self CPU time):")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 2, 1 warm-up + 2 timed steps: minutes")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 16; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 5)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast or float32")
    parser.add_argument("--fused", action="store_true", help="AdamW(fused=True) for both models")
    parser.add_argument(
        "--lit", action="store_true", help="image tower locked; clipcraft caches its features"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--libs", nargs="+", choices=LIBS, default=list(LIBS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory run")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile one step, print top N ops"
    )
    parser.add_argument("--out", default="bench/results/train.json", help="where to write the JSON results")
    parser.add_argument("--memory-child", choices=LIBS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 16)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.steps = args.steps or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args)))
        return 0

    print(
        f"batch {args.batch}, {args.precision}, {args.warmup} warm-up + {args.steps} timed steps each, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    times = measure_speed(args)
    rows: dict[str, dict[str, Any]] = {}
    for lib, seconds in times.items():
        median = statistics.median(seconds)
        rows[lib] = {"step_s": [round(s, 2) for s in seconds], "median_step_s": round(median, 2)}
        rows[lib]["samples_per_s"] = round(args.batch / median, 3)
    if not args.no_memory:
        for lib in rows:
            print(f"  peak memory: {lib} ...", flush=True)
            rows[lib].update(memory_in_subprocess(lib, args))

    ratio = None
    if set(rows) == set(LIBS):
        ratio = round(rows["clipcraft"]["samples_per_s"] / rows["open_clip"]["samples_per_s"], 2)
    print("\n| library | samples/s | median step (s) | peak RSS (MiB) | training memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for lib, row in rows.items():
        peak, train = row.get("peak_rss_mib", "-"), row.get("training_mib", "-")
        print(f"| {lib} | {row['samples_per_s']:.3f} | {row['median_step_s']:.1f} | {peak} | {train} |")
    if ratio is not None:
        print(f"\nclipcraft / open_clip samples/s: {ratio:.2f}x")

    import open_clip
    import timm
    import transformers

    result = {
        "benchmark": "train_step_cpu",
        "command": "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {
            "batch": args.batch,
            "precision": args.precision,
            "warmup": args.warmup,
            "timed_steps": args.steps,
            "threads": torch.get_num_threads(),
            "adamw": {**ADAMW, "fused": args.fused},
            "memory_steps": args.memory_steps,
            "lit": args.lit,
        },
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "transformers": transformers.__version__,
            "open_clip": open_clip.__version__,
        },
        "results": rows,
        "clipcraft_over_open_clip": ratio,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
