"""Sampling a velocity network: the one sampler every stage uses, and the one-step generator.

The one-step generator of a model is z ↦ z + v(z, t0), with t0 the model's `one_step_time` (read from its model
file by `teachers.zoo.load_model`: the time a distilled student was trained at; 0 for every other model). At
t0 = 0 it is exactly one Euler step of the flow, so `sample(..., method="euler", steps=1)` is the one-step
generator for every model (docs/methods.md, "One-step generator").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from slimflow.flow import noise_for
from slimflow.solvers import solve


def one_step_time(model: Callable) -> float:
    """The t0 of a model's one-step generator (0 unless its model file records another)."""
    return float(getattr(model, "one_step_time", 0.0) or 0.0)


def one_step_images(model: Callable, z: torch.Tensor, t0: float | None = None) -> torch.Tensor:
    """z + v(z, t0): the image a one-step generator makes from noise z (t0 defaults to the model's own)."""
    t0 = one_step_time(model) if t0 is None else t0
    return z + model(z, torch.full((z.shape[0],), t0, dtype=z.dtype, device=z.device))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    n: int,
    shape: tuple[int, ...] | None = None,
    method: str = "euler",
    steps: int | None = 1,
    seed: int = 0,
    batch_size: int = 256,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = False,
) -> tuple[torch.Tensor, float]:
    """n samples from noise (seed, 0..n-1) through the model's ODE; returns (images on CPU, mean NFE per sample).
    `shape` defaults to the model's `sample_shape`; Euler with one step is the one-step generator."""
    shape = tuple(model.sample_shape) if shape is None else tuple(shape)
    device = next(model.parameters()).device
    out, nfe = [], 0
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="sampling"):
        index = torch.arange(start, min(n, start + batch_size))
        z = noise_for(index, seed, shape).to(device)
        if method == "euler" and steps == 1:
            x, calls = one_step_images(model, z), 1
        else:
            result = solve(model, z, method=method, steps=steps, rtol=rtol, atol=atol)
            x, calls = result.x, result.nfe
        out.append(x.float().cpu())
        nfe += calls * len(index)
    return torch.cat(out), nfe / n


def one_step_sampler(n: int, shape: tuple[int, ...], seed: int) -> Callable[[torch.nn.Module], torch.Tensor]:
    """sample_fn for the training engine: the one-step images of the noise of (seed, 0..n-1)."""
    return lambda net: sample(net, n, shape, method="euler", steps=1, seed=seed)[0]
