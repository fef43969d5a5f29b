"""Diff-Pruning style gradient accumulation: closed-form sums and the stop rule."""

import pytest
import torch
from torch import nn

from pruning import accumulate_gradients


class Scaled(nn.Module):
    """loss(batch) = batch · w, so d loss / dw = batch; records the mode it ran in."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.modes = []

    def forward(self, scale):
        self.modes.append(self.training)
        return scale * self.w


def test_gradients_sum_until_the_loss_falls_below_the_threshold():
    model = Scaled()
    model.w.grad = torch.tensor(100.0)  # stale gradients are cleared first
    losses = accumulate_gradients(model, lambda m, b: m(b), [1.0, 10.0, 4.0, 0.4, 5.0], stop_ratio=0.05)
    assert losses == pytest.approx([1.0, 10.0, 4.0, 0.4])  # 0.4 < 0.05 · 10 stops after that batch
    assert model.w.grad.item() == pytest.approx(15.4)
    assert model.modes == [False] * 4 and model.training, "runs in eval mode, restores train mode"


def test_all_batches_without_stop_rule_and_tuple_losses():
    model = Scaled()
    losses = accumulate_gradients(model, lambda m, b: (m(b), {"extra": 0}), [1.0, 10.0, 0.1], stop_ratio=None)
    assert len(losses) == 3 and model.w.grad.item() == pytest.approx(11.1)
    with pytest.raises(ValueError, match="no batches"):
        accumulate_gradients(model, lambda m, b: m(b), [])


class VelocityNet(nn.Module):
    """A tiny v(x, t) network: conv stack with the time added as a channel bias."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(1, 8, 3, padding=1)
        self.temb = nn.Linear(1, 8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        h = nn.functional.silu(self.inp(x) + self.temb(t[:, None])[:, :, None, None])
        return self.out(nn.functional.silu(self.mid(h)))


def test_flow_matching_taylor_importance_prunes_a_velocity_net():
    """Diff-Pruning for a flow student: batches ordered by t, loss = flow matching at that t."""
    from pruning import StructuredPruner

    model = VelocityNet()
    data, noise = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)

    def flow_loss(m, t):
        tt = torch.full((len(data),), t)
        x_t = t * data + (1 - t) * noise
        return nn.functional.mse_loss(m(x_t, tt), data - noise)

    pruner = StructuredPruner(model, (data[:1], torch.rand(1)), importance="taylor", ratio=0.5)
    losses = accumulate_gradients(model, flow_loss, [0.0, 0.25, 0.5, 0.75, 1.0], stop_ratio=0.05)
    assert 1 <= len(losses) <= 5 and all(p.grad is not None for p in model.parameters())
    report = pruner.step()
    assert model.inp.out_channels == 4 and model.out.out_channels == 1
    assert report.params < sum(p.numel() for p in VelocityNet().parameters())
    assert model(data, torch.rand(6)).shape == data.shape
