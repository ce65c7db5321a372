"""Training-step throughput and peak memory: clipcraft's seed architecture vs open_clip, side by side, on CPU
or on a CUDA GPU (``--device cuda``).

Both models: the same timm trunk (``vit_base_patch16_224``, random weights, CLS pooling) and the same
transformers MPNet-base text tower built from ``clipcraft.presets.MPNET_BASE`` (no hub), mean pooling. Heads
differ (negligible FLOPs): clipcraft uses its MLP heads (768->512->512 + LayerNorm) on both towers, open_clip a
bias-free linear image projection and its MLP text projection (768->640->512). open_clip's HF text-tower table
has no MPNet entry, so MPNet is registered in it as RoBERTa-like with mean pooling.

One step = forward of both towers on a batch (224x224 images, captions of 12-20 tokens padded to the batch
maximum), CLIP loss, backward, AdamW step (same settings for both). Timed steps alternate between the two
models (A B B A ...) so that load from other jobs on the shared CPU hits both alike; figures are medians.
On CPU, peak memory is measured for each model in its own subprocess (VmHWM of /proc/self/status) so the
two do not pollute each other. On CUDA, both models and batches live on the GPU, each step is bracketed by
``torch.cuda.synchronize()``, and peak memory is measured in-process, one model at a time (built, measured
with ``torch.cuda.max_memory_allocated``, freed), under ``*_cuda_*_mib`` keys (GPU allocator memory, not RSS).

    .venv/bin/python bench/bench_train.py            # batch 16, bf16, 2 warm-up + 5 timed steps each
    .venv/bin/python bench/bench_train.py --quick    # batch 2, 1 warm-up + 2 timed steps each
    .venv/bin/python bench/bench_train.py --lit      # image tower locked (LiT), epochs after the first
    python bench/bench_train.py --device cuda --batch 128 --steps 20     # GPU (default 3 warm-up + 20 steps)
    python bench/bench_train.py --device cuda --batch 64 256 --libs clipcraft  # several batch sizes

With ``--lit`` the image tower is frozen in both. clipcraft then runs it once per image and trains from its
cached features (the first step, a warm-up, fills the cache, as the first epoch does in ``clipcraft train``);
open_clip (``lock_image_tower()``, as ``--lock-image`` does) runs the frozen tower forward on every step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import re
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


def make_batch(
    batch: int, seed: int = 0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, 224, 224) and MPNet-style token ids / mask (B, L): <s> ... </s>, 12-20 tokens, pad id 1.
    Generated on CPU (the same values on every device), then moved to ``device`` if given."""
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
    if device is not None:
        images, ids, mask = images.to(device), ids.to(device), mask.to(device)
    return images, ids, mask


class Trainer:
    """One model, its loss and its AdamW; ``step()`` runs one training step and returns its seconds."""

    def __init__(
        self, lib: str, precision: str, fused: bool, lit: bool = False, device: torch.device | None = None
    ) -> None:
        self.device = torch.device("cpu") if device is None else device
        torch.manual_seed(0)
        model, self.loss_fn = BUILDERS[lib](lit)  # built on CPU (same init on every device), then moved
        self.model = model.to(self.device)  # in place: the loss closures see the moved model
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, **ADAMW, **({"fused": True} if fused else {}))
        self.precision = precision

    def step(self, batch: tuple[torch.Tensor, ...]) -> float:
        cuda = self.device.type == "cuda"
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        if cuda:
            torch.cuda.synchronize(self.device)  # nothing queued before the step counts in its time
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with autocast:
            loss = self.loss_fn(*batch)
        loss.backward()
        self.opt.step()
        if cuda:
            torch.cuda.synchronize(self.device)  # the step's kernels have all run
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


def _mib(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 1)


def measure_memory_cuda(lib: str, args: argparse.Namespace) -> dict[str, float]:
    """In this process, one model at a time (the other one freed): GPU allocator memory after building (model,
    batch; AdamW states come on the first step), and its peak over ``args.memory_steps`` training steps.
    Figures are relative to what was allocated before building (e.g. cuBLAS workspaces kept from earlier)."""
    device = args.torch_device
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    batch = make_batch(args.batch, device=device)
    trainer = Trainer(lib, args.precision, args.fused, args.lit, device)
    torch.cuda.synchronize(device)
    built = torch.cuda.memory_allocated(device)
    for _ in range(args.memory_steps):
        trainer.step(batch)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    del trainer, batch
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "peak_cuda_allocated_mib": _mib(peak - base),
        "after_build_cuda_allocated_mib": _mib(built - base),
        "training_cuda_allocated_mib": _mib(peak - built),
        "peak_cuda_reserved_mib": _mib(reserved),
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
    device = args.torch_device
    d = 1 if device.type == "cpu" else 4  # decimals of the printed step times
    batch = make_batch(args.batch, device=None if device.type == "cpu" else device)
    trainers = {lib: Trainer(lib, args.precision, args.fused, args.lit, device) for lib in args.libs}
    for i in range(args.warmup):
        for lib in trainers:
            print(f"  warm-up {i + 1}/{args.warmup} {lib}: {trainers[lib].step(batch):.{d}f}s", flush=True)
    times: dict[str, list[float]] = {lib: [] for lib in trainers}
    order = list(trainers)
    for i in range(args.steps):
        for lib in order if i % 2 == 0 else order[::-1]:
            times[lib].append(trainers[lib].step(batch))
            print(f"  step {i + 1}/{args.steps} {lib}: {times[lib][-1]:.{d}f}s", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        sort_by, what = "self_cpu_time_total", "self CPU time"
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            sort_by, what = "self_device_time_total", "self CUDA time"
        for lib, trainer in trainers.items():
            with profile(activities=activities) as prof:
                trainer.step(batch)
            print(f"\nprofile of one {lib} step (top ops by {what}):")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.profile))
    return times


def _device(value: str) -> str:
    """argparse type of ``--device``: cpu, cuda or cuda:N."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    return value


def _open_clip_version() -> str | None:
    try:
        import open_clip
    except ImportError:
        return None
    return open_clip.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 2, 1 warm-up + 2 timed steps: minutes")
    parser.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="cpu (default), cuda or cuda:N: where models and batches live",
    )
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="batch size(s) (default 16; 2 with --quick); several run one after the other, one JSON each",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per model (default 2; 3 on CUDA)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per model (default 5; 20 on CUDA)"
    )
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast or float32")
    parser.add_argument("--fused", action="store_true", help="AdamW(fused=True) for both models")
    parser.add_argument(
        "--lit", action="store_true", help="image tower locked; clipcraft caches its features"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--libs", nargs="+", choices=LIBS, default=list(LIBS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory run")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile one step, print top N ops"
    )
    parser.add_argument(
        "--out",
        default="bench/results/train.json",
        help="where to write the JSON results (several batches: one file each, NAME_b<batch>.json)",
    )
    parser.add_argument("--memory-child", choices=LIBS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    batches = args.batch or [2 if args.quick else 16]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3 if cuda else 2)
    args.steps = args.steps or (2 if args.quick else 20 if cuda else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        if not torch.cuda.is_available():
            parser.error(
                f"--device {args.device}: torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}); no usable GPU here, run with --device cpu"
            )
        index = torch.device(args.device).index
        if index is not None and index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    args.torch_device = torch.device(args.device)
    if args.torch_device.type == "cuda" and args.torch_device.index is None:
        args.torch_device = torch.device("cuda", torch.cuda.current_device())
    if args.torch_device.type == "cuda":
        torch.cuda.set_device(args.torch_device)  # anything created on "cuda" without an index lands here too

    if args.memory_child:  # CPU only: a fresh process per model, for its VmHWM
        args.batch = batches[0]
        print(json.dumps(measure_memory(args.memory_child, args)))
        return 0

    if "open_clip" in args.libs:
        try:
            import open_clip  # noqa: F401
        except ImportError as exc:
            print(
                f"error: --libs includes open_clip, but it cannot be imported ({exc!r}).\n"
                "Install open_clip_torch (and its dependency ftfy), or run clipcraft alone: --libs clipcraft",
                file=sys.stderr,
            )
            return 2

    out = Path(args.out)
    for batch in batches:
        args.batch = batch
        path = out if len(batches) == 1 else out.with_name(f"{out.stem}_b{batch}{out.suffix or '.json'}")
        run_one(args, argv, path)
    return 0


def run_one(args: argparse.Namespace, argv: list[str] | None, out: Path) -> None:
    """Speed, then memory, for ``args.batch``; prints a table and writes the JSON results to ``out``."""
    device = args.torch_device
    cuda = device.type == "cuda"
    where = f"{device} ({torch.cuda.get_device_name(device)})" if cuda else "cpu"
    print(
        f"{where}: batch {args.batch}, {args.precision}, {args.warmup} warm-up + {args.steps} timed steps "
        f"each, {torch.get_num_threads()} threads",
        flush=True,
    )
    digits = 4 if cuda else 2  # step times: GPU steps take a fraction of a second
    rows: dict[str, dict[str, Any]] = {}
    error = None
    try:
        times = measure_speed(args)
        for lib, seconds in times.items():
            median = statistics.median(seconds)
            rows[lib] = {
                "step_s": [round(s, digits) for s in seconds],
                "median_step_s": round(median, digits),
            }
            rows[lib]["samples_per_s"] = round(args.batch / median, 3)
        del times
        if not args.no_memory:
            for lib in rows:
                print(f"  peak memory: {lib} ...", flush=True)
                if cuda:
                    rows[lib].update(measure_memory_cuda(lib, args))
                else:
                    rows[lib].update(memory_in_subprocess(lib, args))
    except torch.cuda.OutOfMemoryError as exc:  # record it and go on with the next batch size
        error = f"CUDA out of memory at batch {args.batch}: {str(exc).splitlines()[0]}"
        print(f"  {error}", flush=True)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()

    ratio = None
    if error is None and set(rows) == set(LIBS):
        ratio = round(rows["clipcraft"]["samples_per_s"] / rows["open_clip"]["samples_per_s"], 2)
    if cuda:
        print("\n| library | samples/s | median step (s) | peak CUDA allocated (MiB) | training CUDA (MiB) |")
        peak_key, train_key, fmt = "peak_cuda_allocated_mib", "training_cuda_allocated_mib", ".4f"
    else:
        print("\n| library | samples/s | median step (s) | peak RSS (MiB) | training memory (MiB) |")
        peak_key, train_key, fmt = "peak_rss_mib", "training_mib", ".1f"
    print("|---|---:|---:|---:|---:|")
    for lib, row in rows.items():
        peak, train = row.get(peak_key, "-"), row.get(train_key, "-")
        print(f"| {lib} | {row['samples_per_s']:.3f} | {row['median_step_s']:{fmt}} | {peak} | {train} |")
    if ratio is not None:
        print(f"\nclipcraft / open_clip samples/s: {ratio:.2f}x")

    import timm
    import transformers

    import clipcraft

    machine: dict[str, Any] = {"device": "cpu"}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        machine = {
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device),
            "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": no TF32
        }
    machine |= {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "open_clip": _open_clip_version(),
        "clipcraft": getattr(clipcraft, "__version__", None),
    }
    result = {
        "benchmark": f"train_step_{device.type}",
        "command": "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {
            "device": str(device),
            "libs": list(args.libs),
            "batch": args.batch,
            "precision": args.precision,
            "warmup": args.warmup,
            "timed_steps": args.steps,
            "threads": torch.get_num_threads(),
            "adamw": {**ADAMW, "fused": args.fused},
            "memory_steps": args.memory_steps,
            "memory": None if args.no_memory else ("cuda_max_memory_allocated" if cuda else "vm_hwm"),
            "lit": args.lit,
        },
        "machine": machine,
        "results": rows,
        "clipcraft_over_open_clip": ratio,
        "error": error,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", flush=True)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
