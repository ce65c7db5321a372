"""Command-line flags that several subcommands share, with one help text each, and the one place a command
turns ``--device`` and ``--precision`` into a torch device and a concrete precision.

Registration imports nothing heavy (torch is imported inside :func:`device_of`), so ``clipcraft --help``
stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from clipcraft.errors import ClipcraftError
from clipcraft.precision import INFERENCE_DEFAULT, REQUESTS, Precision, resolve_precision

PRECISION_HELP = (
    "fp32 | bf16 | auto. auto: bf16 where the hardware has native bf16 (CUDA devices that support it, CPUs with "
    "AVX512-BF16 or AMX), else fp32. The precision that ran is recorded with the result"
)
DEVICE_HELP = "torch device: auto (cuda if available, else cpu), cpu, cuda or cuda:N"
WORKERS_HELP = "image decoding processes; default: 0 for fewer than 256 images, else half the CPUs (1 to 8)"


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_precision(p: argparse.ArgumentParser, default: str = INFERENCE_DEFAULT) -> None:
    """``--precision``; inference commands default to fp32 (the same numbers on every machine)."""
    p.add_argument("--precision", choices=list(REQUESTS), default=default, help=PRECISION_HELP)


def add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)


def add_batch_size(p: argparse.ArgumentParser, default: int = 64, what: str = "images") -> None:
    p.add_argument("--batch-size", type=int, default=default, help=f"{what} per forward pass")


def add_encoding(p: argparse.ArgumentParser, batch_size: int = 64) -> None:
    """The flags of every command that encodes: --device, --precision, --batch-size, --workers."""
    add_device(p)
    add_precision(p)
    add_batch_size(p, batch_size)
    add_workers(p)


def device_of(name: str | None) -> Any:
    """``--device`` -> a torch.device; ``auto`` (or None) is cuda when available, else cpu."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ClipcraftError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:N).") from exc


def precision_of(args: argparse.Namespace, device: Any) -> Precision:
    """``--precision`` resolved for ``device``: the one place a command decides what ``auto`` means."""
    return resolve_precision(getattr(args, "precision", INFERENCE_DEFAULT), device)


def load_model_arg(path: str, device: Any) -> Any:
    """The saved model directory of ``--model``, loaded onto ``device`` (a missing or foreign directory is a
    :class:`~clipcraft.errors.CheckpointError` that says what is missing)."""
    from clipcraft.model import load

    return load(path, device=device)


def check_batch_size(args: argparse.Namespace) -> None:
    if getattr(args, "batch_size", 1) < 1:
        raise ClipcraftError(f"--batch-size must be >= 1; got {args.batch_size}.")


def rerun_command(args: argparse.Namespace) -> str:
    """The shell command line that runs this ``clipcraft`` command again, as typed (``main`` records the
    arguments in ``args.argv``), quoted where needed."""
    import shlex

    return shlex.join(["clipcraft", *getattr(args, "argv", [])])


def print_help_and_fail(parser: argparse.ArgumentParser) -> int:
    """What a command group (``eval``, ``index``, ``export``) does when no action is given: help, exit 2."""
    parser.print_help()
    return 2
