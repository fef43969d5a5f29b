"""Sampling from a velocity network."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from slimflow.pairs import noise_for
from slimflow.solvers import solve


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    n: int,
    shape: tuple[int, ...],
    method: str = "euler",
    steps: int | None = 1,
    seed: int = 0,
    batch_size: int = 256,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = False,
) -> tuple[torch.Tensor, float]:
    """n samples from noise (seed, 0..n-1) through the model's ODE; returns (images on CPU, mean NFE per sample)."""
    device = next(model.parameters()).device
    out, nfe = [], 0
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="sampling"):
        index = torch.arange(start, min(n, start + batch_size))
        z = noise_for(index, seed, shape).to(device)
        result = solve(model, z, method=method, steps=steps, rtol=rtol, atol=atol)
        out.append(result.x.float().cpu())
        nfe += result.nfe * len(index)
    return torch.cat(out), nfe / n
