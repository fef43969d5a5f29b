"""2-D toy of the whole SlimFlow recipe: a 1-RF teacher on "gaussians8", pairs from its ODE with the real pair
store, annealing reflow (β from 1 to 0) of a smaller student, flow-guided distillation. Claims, with margins:
the student's flow is straighter than the teacher's, its one-step samples are closer to the data than the
teacher's one-step samples, and distillation brings them closer still."""

import copy
import math

import pytest
import torch
from torch import nn

from slimflow.data import sample_toy
from slimflow.engine import Trainer
from slimflow.flow import interpolate, velocity_target
from slimflow.losses import l2
from slimflow.pairs import PairStore, generate_pairs
from slimflow.solvers import solve, straightness
from slimflow.stages.anneal import anneal_loss, make_anneal_batch
from slimflow.stages.distill import DEFAULTS, distill_loss, make_distill_batch
from slimflow.stages.runner import full_config

TOY = "gaussians8"


class ToyVelocity(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.config = {"hidden": hidden}
        self.net = nn.Sequential(
            nn.Linear(3, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance of two equal-size point sets (n, d): the root mean, over random unit
    directions, of the mean squared difference of the sorted projections."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(a.shape[1], directions, generator=torch.Generator().manual_seed(seed))
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(dim=0).values, (b @ theta).sort(dim=0).values
    return (pa - pb).square().mean().sqrt().item()


def test_sliced_wasserstein_closed_forms():
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    assert sliced_wasserstein(x, x) == 0.0
    # a shift by s moves every projection by s·cosθ: SW² = E[(s·cosθ)²] = s²/2 in 2-D
    shift = torch.tensor([3.0, 0.0])
    assert sliced_wasserstein(x, x + shift, directions=1024) == pytest.approx(3.0 / math.sqrt(2), rel=0.04)


def train_teacher(steps: int = 2000, batch: int = 512) -> ToyVelocity:
    torch.manual_seed(0)
    model = ToyVelocity(hidden=128)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        x, z, t = sample_toy(TOY, batch, gen), torch.randn(batch, 2, generator=gen), torch.rand(batch, generator=gen)
        loss = (model(interpolate(z, x, t), t) - velocity_target(z, x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    return model.eval().requires_grad_(False)


TRAIN = {
    "batch_size": 256,
    "lr": 3e-3,
    "warmup": 20,
    "grad_clip": 1.0,
    "log_every": 100,
    "ckpt_every": 0,
    "ema": {"kind": "power", "decay": 0.99, "max_decay": 0.99},
    "seed": 0,
}


def one_step(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return solve(model, z, method="euler", steps=1).x


def test_annealed_student_is_straighter_and_better_in_one_step_and_distillation_improves_it(tmp_path):
    teacher = train_teacher()
    generate_pairs(
        teacher,
        tmp_path / "pairs",
        n=4096,
        shape=(2,),
        seed=0,
        solver={"method": "dopri5"},
        shard_size=2048,
        batch_size=2048,
        progress=False,
    )
    store = PairStore(tmp_path / "pairs")

    torch.manual_seed(1)
    student = ToyVelocity(hidden=64)
    cfg = {
        "beta": {"schedule": "linear", "steps": 1000, "value": 1.0},
        "hflip": False,
        "flow": {"time_sampler": "uniform", "eps": 1e-3, "a": 4.0, "loss": "l2"},
        "train": {**TRAIN, "steps": 1400},
    }
    trainer = Trainer(student, cfg["train"], tmp_path / "anneal", {"model": student.config})
    result = trainer.fit(make_anneal_batch(store, cfg), anneal_loss(cfg["flow"]))
    assert result["history"][0]["train/beta"] > 0.9 and result["history"][-1]["train/beta"] == 0.0
    annealed = trainer.ema.eval()

    z = torch.randn(16384, 2, generator=torch.Generator().manual_seed(123))
    data = sample_toy(TOY, 16384, torch.Generator().manual_seed(7))
    s_teacher, s_student = straightness(teacher, z[:4096], 64), straightness(annealed, z[:4096], 64)
    sw_teacher = sliced_wasserstein(one_step(teacher, z), data)
    sw_annealed = sliced_wasserstein(one_step(annealed, z), data)
    # measured here: straightness 0.72 → 0.0096, one-step SW 1.29 → 0.13
    assert s_student < 0.1 * s_teacher, (s_student, s_teacher)
    assert sw_annealed < 0.3 * sw_teacher, (sw_annealed, sw_teacher)

    guide = copy.deepcopy(annealed)
    # the stage's default loss: l2, reference variant, weights 1:1, t' ~ U(0.2, 0.8), one-step time 0
    distill_cfg = full_config(DEFAULTS, {"train": {**TRAIN, "steps": 600, "lr": 1e-3}})
    loss = distill_cfg["loss"]
    assert (loss["distance"], loss["variant"], loss["t_min"], loss["t_max"]) == ("l2", "reference", 0.2, 0.8)
    trainer = Trainer(
        copy.deepcopy(annealed).train().requires_grad_(True), distill_cfg["train"], tmp_path / "distill", {}
    )
    trainer.fit(
        make_distill_batch(store, distill_cfg["train"], loss), distill_loss(guide.requires_grad_(False), l2, loss)
    )
    sw_distilled = sliced_wasserstein(one_step(trainer.ema.eval(), z), data)
    # measured here: 0.13 → 0.084 (the teacher's own ODE samples: 0.067; two data samples: 0.049)
    assert sw_distilled < 0.85 * sw_annealed, (sw_distilled, sw_annealed, sw_teacher)
