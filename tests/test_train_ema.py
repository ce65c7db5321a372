"""The weight average (``ema_decay``) on a small model; the training run that saves and resumes it is in
test_train.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipcraft.train.ema import WeightAverage


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net[2].weight.requires_grad_(False)  # a frozen parameter: not copied, never changes
    return net


def _nudge(net: nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(by)
        net[1].running_mean.add_(by)


def test_decay_zero_is_the_weights_and_the_average_follows_the_formula() -> None:
    net = _net()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    identity = WeightAverage(net, 0.0)
    average = WeightAverage(net, 0.75)
    assert "2.weight" not in average.average and "1.running_mean" in average.average
    for _ in range(3):
        _nudge(net, 1.0)
        identity.update(net)
        average.update(net)
    for name, value in identity.average.items():
        assert torch.equal(value, dict(net.named_parameters(), **dict(net.named_buffers()))[name])
    # three updates of +1, +2, +3 over the start: 0.75^3 * w0 + 0.25 * (0.75^2 (w0+1) + 0.75 (w0+2) + (w0+3))
    expected = start["0.bias"] + 0.25 * (0.75**2 * 1 + 0.75 * 2 + 3)
    torch.testing.assert_close(average.average["0.bias"], expected)


def test_applied_swaps_the_average_in_and_the_weights_back_bit_for_bit() -> None:
    net = _net()
    average = WeightAverage(net, 0.5)
    _nudge(net, 2.0)
    average.update(net)
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with average.applied(net):
        torch.testing.assert_close(net[0].bias, average.average["0.bias"])
        assert not torch.equal(net[0].bias, raw["0.bias"])
    for name, value in net.state_dict().items():
        assert torch.equal(value, raw[name])
    copy = WeightAverage(_net(), 0.5)
    copy.load_state_dict(average.state_dict())
    assert all(torch.equal(copy.average[n], average.average[n]) for n in average.names)
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(net, 1.0)
