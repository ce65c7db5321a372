"""Numeric precision, decided in one place.

Users speak three words: ``fp32``, ``bf16`` and ``auto``. :func:`resolve_precision` turns them, once, at the
edge (the CLI, :func:`clipcraft.train.train`, :func:`clipcraft.finetune.finetune`, ``Index.build``, the
evaluation entry points, ``ClipModel.encode_*``), into a :class:`Precision`; every lower layer takes that
typed value and never sees ``auto`` (:func:`as_precision` refuses it there).

``auto`` means bf16 where the hardware multiplies bf16 matrices natively (CUDA devices that support it, CPUs
with AVX512-BF16 or AMX) and fp32 everywhere else: emulated bf16 is several times slower than fp32 (ViT-Tiny
ran at 1.7 images/s in bf16 against 11.5 in fp32 on a 2-core AVX2 CPU). Because ``auto`` depends on the
machine, inference and evaluation default to ``fp32`` (:data:`INFERENCE_DEFAULT`): the same numbers on
every machine, comparable with published ones. Training defaults to ``auto`` (:data:`TRAINING_DEFAULT`).
The precision that actually ran is recorded with every result (run config, summary, checkpoint, eval JSON,
index manifest).
"""

from __future__ import annotations

import contextlib
import enum
import functools
from typing import Any

from clipcraft.errors import ClipcraftError

REQUESTS = ("auto", "fp32", "bf16")  # the words a user may give
PRECISIONS = REQUESTS  # kept for callers that list the choices
INFERENCE_DEFAULT = "fp32"  # embed, index, search, eval, classify, serve
TRAINING_DEFAULT = "auto"  # train, finetune


class Precision(str, enum.Enum):
    """A concrete precision: what a computation runs in. Compares equal to its name (``"fp32"``)."""

    FP32 = "fp32"
    BF16 = "bf16"

    def __str__(self) -> str:
        return self.value


# CPU features that mean bf16 matrix products run natively (x86: AVX512-BF16, AMX; Arm: the BF16 extension).
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (:data:`NATIVE_BF16_FEATURES`), from torch's
    public ``torch.cpu.get_capabilities()``; older torch without it: its private probes. Tests patch this
    function, never the host."""
    import torch

    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        caps = get()
        return any(bool(caps.get(name, False)) for name in NATIVE_BF16_FEATURES)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch < 2.10
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cuda_has_bf16(device: Any = None) -> bool:
    """Whether the CUDA device supports bf16 (public torch API)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_precision(request: str | Precision, device: Any) -> Precision:
    """The user's word -> the :class:`Precision` that runs on ``device`` (a torch.device or its name).

    ``auto``: bf16 where ``device`` has native bf16 (see the module docstring), else fp32; ``fp32`` and
    ``bf16`` pass through (bf16 is honoured on any device: on a CPU without bf16 units it is emulated, slow
    but correct). Raises :class:`~clipcraft.errors.ClipcraftError` for any other word.
    """
    if isinstance(request, Precision):
        return request
    if request not in REQUESTS:
        raise ClipcraftError(f"precision must be one of {', '.join(REQUESTS)}; got {request!r}.")
    if request != "auto":
        return Precision(request)
    kind = device_type(device)
    native = cuda_has_bf16(device) if kind == "cuda" else kind == "cpu" and cpu_has_native_bf16()
    return Precision.BF16 if native else Precision.FP32


def as_precision(value: str | Precision) -> Precision:
    """A lower layer's check of what it was given: a concrete precision (``fp32``/``bf16``), never ``auto``.

    Raises :class:`~clipcraft.errors.ClipcraftError` for ``auto`` (the edge should have resolved it) and for
    unknown words.
    """
    if isinstance(value, Precision):
        return value
    if value == "auto":
        raise ClipcraftError(
            "precision 'auto' reached a layer that needs a concrete precision; resolve it first with "
            "clipcraft.precision.resolve_precision(request, device)."
        )
    try:
        return Precision(value)
    except ValueError:
        raise ClipcraftError(f"precision must be fp32 or bf16; got {value!r}.") from None


def autocast(device: Any, precision: Precision | str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` when ``precision`` is bf16; a no-op context for fp32."""
    if as_precision(precision) is Precision.BF16:
        import torch

        return torch.autocast(device_type(device), dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_type(device: Any) -> str:
    """ "cuda" for torch.device("cuda:1") or the string "cuda:1"; "cpu" likewise."""
    return getattr(device, "type", str(device).split(":")[0])
