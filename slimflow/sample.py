"""Sampling a velocity network: the one sampler every stage uses, and the one-step generator.

The one-step generator of a model is z ↦ z + v(z, t0), with t0 the model's `one_step_time` (read from its model
file by `teachers.zoo.load_model`: the time a distilled student was trained at; 0 for every other model). At
t0 = 0 it is exactly one Euler step of the flow, so `sample(..., method="euler", steps=1)` is the one-step
generator for every model (docs/methods.md, "One-step generator").

Class-conditional models (`num_classes` > 0) take labels: `sample(..., labels=c)` makes n images of class c,
`labels=None` or "balanced" the class-balanced set (sample i of class i mod K), or one label per sample; `guidance`
w ≠ 1 is classifier-free guidance v = v(x, t, ∅) + w·(v(x, t, c) − v(x, t, ∅)) (docs/methods.md, "Class
conditioning").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from slimflow.flow import balanced_labels, noise_for
from slimflow.solvers import solve
from teachers.unet import NO_LABEL, check_labels


def num_classes(model: Callable) -> int:
    """The class count of a conditional model (0: unconditional)."""
    return int(getattr(model, "num_classes", 0) or 0)


def check_guidance(model: Callable, guidance: float) -> float:
    """`guidance` as a float, or a ValueError when it is not finite or the model is unconditional and w != 1."""
    guidance = float(guidance)
    if not torch.isfinite(torch.tensor(guidance)):
        raise ValueError(f"guidance scale must be finite, got {guidance}")
    if guidance != 1.0 and not num_classes(model):
        raise ValueError(f"classifier-free guidance (scale {guidance}) needs a class-conditional model")
    return guidance


def resolve_labels(model: Callable, n: int, labels=None) -> torch.Tensor | None:
    """The n labels of a sampling call (see the module docstring), checked; None for an unconditional model."""
    k = num_classes(model)
    if not k:
        return check_labels(labels, 0, n)  # None, or the error for labels given to an unconditional model
    if labels is None or (isinstance(labels, str) and labels == "balanced"):
        return balanced_labels(n, k)
    if isinstance(labels, str):
        raise ValueError(f"labels must be a class, 'balanced' or one label per sample, got {labels!r}")
    return check_labels(labels, k, n)


def conditioned(model: Callable, labels: torch.Tensor | None = None, guidance: float = 1.0) -> Callable:
    """The velocity v(x, t) of `model` under `labels` (one per sample; None for an unconditional model) with
    classifier-free guidance scale `guidance` (1: none; otherwise one network call on the doubled batch)."""
    if labels is None:
        if guidance != 1.0:
            raise ValueError("classifier-free guidance needs labels (a class-conditional model)")
        return model
    if guidance == 1.0:
        return lambda x, t: model(x, t, labels.to(x.device))

    def guided(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        lab = labels.to(x.device)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([lab, torch.full_like(lab, NO_LABEL)]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    return guided


def one_step_time(model: Callable) -> float:
    """The t0 of a model's one-step generator (0 unless its model file records another)."""
    return float(getattr(model, "one_step_time", 0.0) or 0.0)


def one_step_images(
    model: Callable, z: torch.Tensor, t0: float | None = None, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """z + v(z, t0[, labels]): the image a one-step generator makes from noise z (t0 defaults to the model's own;
    labels, one per sample, for a conditional model)."""
    t0 = one_step_time(model) if t0 is None else t0
    return z + conditioned(model, labels)(z, torch.full((z.shape[0],), t0, dtype=z.dtype, device=z.device))


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
    labels: int | str | torch.Tensor | None = None,
    guidance: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """n samples from noise (seed, 0..n-1) through the model's ODE; returns (images on CPU, mean NFE per sample).
    `shape` defaults to the model's `sample_shape`; Euler with one step is the one-step generator. `labels` and
    `guidance`: see the module docstring (a guided NFE is one call on a doubled batch)."""
    shape = tuple(model.sample_shape) if shape is None else tuple(shape)
    all_labels, guidance = resolve_labels(model, n, labels), check_guidance(model, guidance)
    device = next(model.parameters()).device
    out, nfe = [], 0
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="sampling"):
        index = torch.arange(start, min(n, start + batch_size))
        z = noise_for(index, seed, shape).to(device)
        lab = None if all_labels is None else all_labels[index].to(device)
        if method == "euler" and steps == 1 and guidance == 1.0:
            x, calls = one_step_images(model, z, labels=lab), 1
        else:
            velocity = conditioned(model, lab, guidance)
            result = solve(velocity, z, method=method, steps=steps, rtol=rtol, atol=atol)
            x, calls = result.x, result.nfe
        out.append(x.float().cpu())
        nfe += calls * len(index)
    return torch.cat(out), nfe / n


def one_step_sampler(n: int, shape: tuple[int, ...], seed: int) -> Callable[[torch.nn.Module], torch.Tensor]:
    """sample_fn for the training engine: the one-step images of the noise of (seed, 0..n-1)."""
    return lambda net: sample(net, n, shape, method="euler", steps=1, seed=seed)[0]
