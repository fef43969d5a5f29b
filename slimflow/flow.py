"""Rectified-flow maths: interpolant, velocity target, time samplers and the exact Gaussian 1-RF field.

Convention (SPEC §0): t = 0 is noise z ~ N(0, I), t = 1 is data x; x_t = t·x + (1 − t)·z; v* = x − z.
"""
from __future__ import annotations

import math

import torch

TIME_SAMPLERS = ("uniform", "u_shaped", "logit_normal")
U_SHAPED_CLAMP = 1e-5


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t of shape (B,) viewed as (B, 1, ..., 1) so it broadcasts over the non-batch dims of `like`."""
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({like.shape[0]},) to match the batch; got {tuple(t.shape)}")
    return t.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def interpolate(noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t·data + (1 − t)·noise, with t of shape (B,) broadcast over the remaining dims."""
    if noise.shape != data.shape:
        raise ValueError(f"noise and data must have the same shape; got {tuple(noise.shape)} and {tuple(data.shape)}")
    tb = _per_sample(t, data)
    return tb * data + (1 - tb) * noise


def velocity_target(noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """The rectified-flow regression target v* = data − noise (the straight-line velocity)."""
    if noise.shape != data.shape:
        raise ValueError(f"noise and data must have the same shape; got {tuple(noise.shape)} and {tuple(data.shape)}")
    return data - noise


def sample_time(
    n: int,
    kind: str = "uniform",
    *,
    eps: float = 1e-3,
    a: float = 4.0,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n training times in [0, 1] (float32, shape (n,)).

    uniform: U[eps, 1]. u_shaped (rfpp): density ∝ cosh(a(t − ½)), clamped to [1e-5, 1 − 1e-5].
    logit_normal: sigmoid(N(mean, std²)). The device defaults to the generator's (CPU without one).
    """
    if n < 1:
        raise ValueError(f"sample_time needs n >= 1; got {n}")
    if device is None and generator is not None:
        device = generator.device
    kw = {"generator": generator, "device": device}
    if kind == "uniform":
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"uniform time sampler needs 0 <= eps < 1; got eps={eps}")
        return eps + (1.0 - eps) * torch.rand(n, **kw)
    if kind == "u_shaped":
        if a <= 0:
            raise ValueError(f"u_shaped time sampler needs a > 0; got a={a}")
        # Inverse CDF of the density ∝ e^{a·u} on [0, 1]; mirroring half of the draws gives ∝ cosh(a(t − ½)).
        u = torch.log1p(torch.rand(n, **kw) * math.expm1(a)) / a
        mirrored = torch.zeros(n, dtype=torch.bool, device=u.device)
        mirrored[torch.randperm(n, **kw)[: n // 2]] = True
        t = torch.where(mirrored, 1.0 - u, u)
        return t.clamp(U_SHAPED_CLAMP, 1.0 - U_SHAPED_CLAMP)
    if kind == "logit_normal":
        if std <= 0:
            raise ValueError(f"logit_normal time sampler needs std > 0; got std={std}")
        return torch.sigmoid(mean + std * torch.randn(n, **kw))
    raise ValueError(f"unknown time sampler {kind!r}; choose one of {', '.join(TIME_SAMPLERS)}")


def gaussian_rf_velocity(
    x: torch.Tensor,
    t: torch.Tensor,
    mean: torch.Tensor | float,
    std: torch.Tensor | float,
) -> torch.Tensor:
    """Exact 1-RF velocity E[x₁ − z | x_t = x] for z ~ N(0, I) and data x₁ ~ N(mean, diag(std²)), independent.

    Per dimension (x_t, x₁ − z) is jointly Gaussian: E[x_t] = t·m, Var[x_t] = t²s² + (1 − t)²,
    Cov[x₁ − z, x_t] = t·s² − (1 − t), so v(x, t) = m + (t·s² − (1 − t)) / (t²s² + (1 − t)²) · (x − t·m).
    Its ODE maps z to x_t = t·m + sqrt(t²s² + (1 − t)²)·z, hence z ↦ m + s·z at t = 1.
    `mean` and `std` broadcast against one sample (x.shape[1:]); std must be positive; t has shape (B,).
    """
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if (s <= 0).any():
        raise ValueError("gaussian_rf_velocity needs std > 0 in every dimension (the field is singular at t = 1 otherwise)")
    tb = _per_sample(t, x)
    var = s * s
    gain = (tb * var - (1 - tb)) / (tb * tb * var + (1 - tb) ** 2)
    return m + gain * (x - tb * m)
