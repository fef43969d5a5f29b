"""A tiny velocity MLP and a flow-matching task on 2-D Gaussian data, shared by engine tests and the torchrun script."""

from __future__ import annotations

import torch
from torch import nn

from slimflow.engine import Trainer
from slimflow.flow import interpolate, velocity_target


class TinyVelocity(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "dropout": dropout}
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], dim=1))


DATA = torch.randn(512, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + torch.tensor([2.0, -1.0])


def make_batch(step: int, gen: torch.Generator, batch_size: int = 16) -> dict:
    idx = torch.randint(len(DATA), (batch_size,), generator=gen)
    x, z, t = DATA[idx], torch.randn(batch_size, 2, generator=gen), torch.rand(batch_size, generator=gen)
    return {"x_t": interpolate(z, x, t), "t": t, "target": velocity_target(z, x)}


def loss_fn(model, batch):
    return ((model(batch["x_t"], batch["t"]) - batch["target"]) ** 2).mean()


def make_trainer(run_dir, steps: int, dropout: float = 0.1, hidden: int = 32, **train_cfg) -> Trainer:
    torch.manual_seed(0)  # the initial weights, like a trainer seeding before it builds its model
    model = TinyVelocity(hidden=hidden, dropout=dropout)
    cfg = {
        "steps": steps,
        "batch_size": 16,
        "lr": 1e-2,
        "warmup": 5,
        "log_every": 1,
        "ckpt_every": 4,
        "ema": {"kind": "power", "decay": 0.99, "max_decay": 0.999},
        **train_cfg,
    }
    return Trainer(model, cfg, run_dir, {"model": model.config})


def train(run_dir, steps: int, **kwargs) -> tuple[Trainer, dict]:
    trainer = make_trainer(run_dir, steps, **kwargs)
    return trainer, trainer.fit(make_batch, loss_fn)
