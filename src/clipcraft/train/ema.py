"""An exponential moving average of the weights, for evaluation (``ema_decay`` in the training config).

After every optimizer step ``average = decay * average + (1 - decay) * weights`` for each trainable
parameter and floating-point buffer; frozen parameters never change, so they are not copied. Validation,
the saved ``last``/``best`` models and the test split use the average; training goes on with the raw
weights, and the checkpoint holds both, so a resumed run continues the same average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class WeightAverage:
    """The moving average of ``model``'s trainable parameters and floating-point buffers.

    ``decay`` in [0, 1): 0 makes the average equal the weights after every update (the identity, a check
    of the bookkeeping); values near 1 average over about ``1 / (1 - decay)`` steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.names += [n for n, b in model.named_buffers() if b.is_floating_point()]
        tensors = self._tensors(model)
        self.average = {n: tensors[n].detach().clone() for n in self.names}

    def _tensors(self, model: nn.Module) -> dict[str, Tensor]:
        found = dict(model.named_parameters())
        found.update(dict(model.named_buffers()))
        return {n: found[n] for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights into the average (call after each optimizer step)."""
        for name, tensor in self._tensors(model).items():
            self.average[name].mul_(self.decay).add_(tensor.detach(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the average inside the block; its own weights come back afterwards, bit for bit."""
        tensors = self._tensors(model)
        saved = {n: t.detach().clone() for n, t in tensors.items()}
        try:
            with torch.no_grad():
                for name, tensor in tensors.items():
                    tensor.copy_(self.average[name])
            yield
        finally:
            with torch.no_grad():
                for name, tensor in tensors.items():
                    tensor.copy_(saved[name])

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "average": {n: t.clone() for n, t in self.average.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        average = state["average"]
        assert isinstance(average, dict)
        missing = sorted(set(self.names) - set(average))
        if missing:
            raise KeyError(f"The checkpoint's weight average lacks {missing[:5]}")
        for name in self.names:
            self.average[name].copy_(average[name])
