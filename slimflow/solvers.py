"""Batched ODE solvers for dx/dt = v(x, t) in torch, with exact NFE counts.

`velocity(x, t)` gets t as a tensor of shape (B,) on x's device and dtype. t_end < t_start integrates
backwards (inversion: data → noise). Gradients flow through the solver unless the caller disables them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FIXED_STEP_METHODS = ("euler", "heun", "midpoint", "rf_solver")
METHODS = (*FIXED_STEP_METHODS, "dopri5")


class ODESolution(NamedTuple):
    """Final state, number of velocity evaluations, visited states (return_path) and their times."""

    x: torch.Tensor
    nfe: int
    path: list[torch.Tensor] | None
    times: list[float]


class _Counted:
    """A velocity field that takes a float time and counts its calls."""

    def __init__(self, velocity: Velocity):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.calls += 1
        return self.velocity(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))


def euler_step(f: _Counted, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """x + h·v(x, t) (1 NFE)."""
    return x + h * f(x, t)


def heun_step(f: _Counted, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """Euler predictor, trapezoid corrector (2 NFE)."""
    v = f(x, t)
    v_end = f(x + h * v, t + h)
    return x + (0.5 * h) * (v + v_end)


def midpoint_step(f: _Counted, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """Explicit midpoint rule (2 NFE)."""
    return x + h * f(x + (0.5 * h) * f(x, t), t + 0.5 * h)


def rf_solver_step(f: _Counted, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """RF-Solver (docs/methods.md, "Solvers"): second-order Taylor step with v' estimated from a half-step (2 NFE)."""
    v = f(x, t)
    v_mid = f(x + (0.5 * h) * v, t + 0.5 * h)
    dv = (v_mid - v) / (0.5 * h)
    return x + h * v + (0.5 * h * h) * dv


_STEPS = {"euler": euler_step, "heun": heun_step, "midpoint": midpoint_step, "rf_solver": rf_solver_step}

# Dormand–Prince 5(4): nodes, stage coefficients, 5th-order weights (= last stage row, FSAL), and
# the 5th- minus 4th-order weights that estimate the local error.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = _DP_A[6]
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip((*_DP_B5, 0.0), _DP_B4))
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def _combine(x: torch.Tensor, h: float, weights: tuple[float, ...], ks: list[torch.Tensor]) -> torch.Tensor:
    """x + h·Σ wᵢ·kᵢ, skipping zero weights."""
    out = x
    for w, k in zip(weights, ks):
        if w != 0.0:
            out = out + (h * w) * k
    return out


def _error_norm(err: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor, rtol: float, atol: float) -> float:
    """Max over samples of the per-sample RMS of err / (atol + rtol·max(|x|, |x_new|))."""
    scale = atol + rtol * torch.maximum(x.detach().abs(), x_new.detach().abs())
    ratio = (err.detach() / scale).float().flatten(1)
    return ratio.pow(2).mean(dim=1).sqrt().max().item()


def _initial_step(
    f: _Counted, x: torch.Tensor, t: float, v: torch.Tensor, span: float, rtol: float, atol: float
) -> float:
    """Hairer–Wanner starting step size for an order-5 method (costs 1 NFE); positive, at most |span|."""
    scale = atol + rtol * x.detach().abs()

    def rms(y: torch.Tensor) -> float:
        return (y.detach() / scale).float().flatten(1).pow(2).mean(dim=1).sqrt().max().item()

    d0, d1 = rms(x), rms(v)
    if not math.isfinite(d0 + d1):
        raise RuntimeError(f"dopri5: the state or the velocity at t={t} has non-finite values")
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, abs(span))
    direction = 1.0 if span > 0 else -1.0
    d2 = rms(f(x + (direction * h0) * v, t + direction * h0) - v) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1, abs(span))


def _dopri5(
    f: _Counted,
    x: torch.Tensor,
    t_start: float,
    t_end: float,
    rtol: float,
    atol: float,
    max_steps: int,
    path: list[torch.Tensor] | None,
    times: list[float],
) -> torch.Tensor:
    span = t_end - t_start
    direction = 1.0 if span > 0 else -1.0
    t, v = t_start, f(x, t_start)
    h = _initial_step(f, x, t, v, span, rtol, atol)
    min_h = 1e-12 * abs(span)
    for _ in range(max_steps):
        if direction * (t_end - t) <= min_h:
            return x
        h = min(h, abs(t_end - t))
        hs = direction * h
        ks = [v]
        for c, row in zip(_DP_C[1:], _DP_A[1:]):
            ks.append(f(_combine(x, hs, row, ks), t + c * hs))
        x_new = _combine(x, hs, _DP_B5, ks)
        err = _error_norm(_combine(torch.zeros_like(x), hs, _DP_E, ks), x, x_new, rtol, atol)
        if err <= 1.0:  # accept; the last stage is v at (x_new, t + h) (first same as last)
            t = t_end if h == abs(t_end - t) else t + hs
            x, v = x_new, ks[-1]
            if path is not None:
                path.append(x)
            times.append(t)
            factor = _MAX_FACTOR if err == 0.0 else min(_MAX_FACTOR, _SAFETY * err**-0.2)
        elif not math.isfinite(err):
            factor = _MIN_FACTOR
        else:
            factor = max(_MIN_FACTOR, _SAFETY * err**-0.2)
        h *= factor
        if h < min_h:
            raise RuntimeError(
                f"dopri5 step size underflow at t={t:.6g} (h={h:.3g}): the velocity field is non-finite or too stiff "
                f"for rtol={rtol}, atol={atol}"
            )
    if direction * (t_end - t) <= min_h:
        return x
    raise RuntimeError(
        f"dopri5 did not reach t_end={t_end} within max_steps={max_steps} attempted steps (stopped at t={t:.6g}); "
        "loosen rtol/atol or raise max_steps"
    )


def solve(
    velocity: Velocity,
    x: torch.Tensor,
    method: str = "euler",
    steps: int | None = None,
    t_start: float = 0.0,
    t_end: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
    return_path: bool = False,
) -> ODESolution:
    """Integrate dx/dt = velocity(x, t) from t_start to t_end over a batch x of shape (B, ...).

    Fixed-step methods (euler: 1 NFE/step; heun, midpoint, rf_solver: 2 NFE/step) use `steps` equal steps.
    dopri5 is adaptive Dormand–Prince 5(4) with FSAL; it ignores `steps`. A step is accepted when, for every
    sample, the RMS over its elements of err / (atol + rtol·|x|) is ≤ 1 (per-sample RMS, max over the batch:
    batching never loosens any one sample's tolerance). Its NFE counts every call, including the starting-step
    estimate and rejected steps; `max_steps` bounds the attempted steps. `path` holds the initial state and every
    accepted state when return_path is set; `times` their times.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {', '.join(METHODS)}")
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("solve needs x as a floating-point tensor of shape (B, ...)")
    t_start, t_end = float(t_start), float(t_end)
    if t_start == t_end:
        raise ValueError(f"t_start and t_end are both {t_start}: nothing to integrate")
    f = _Counted(velocity)
    path = [x] if return_path else None
    times = [t_start]
    if method == "dopri5":
        if rtol <= 0 or atol <= 0:
            raise ValueError(f"dopri5 needs rtol > 0 and atol > 0; got rtol={rtol}, atol={atol}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1; got {max_steps}")
        x = _dopri5(f, x, t_start, t_end, rtol, atol, max_steps, path, times)
        return ODESolution(x, f.calls, path, times)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"method {method!r} needs an integer steps >= 1; got {steps!r}")
    step = _STEPS[method]
    grid = [t_start + (t_end - t_start) * i / steps for i in range(steps + 1)]
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = step(f, x, t, t_next - t)
        if path is not None:
            path.append(x)
    return ODESolution(x, f.calls, path, grid)


@torch.no_grad()
def straightness(velocity: Velocity, noise: torch.Tensor, steps: int = 100) -> float:
    """Liu et al.'s straightness S = ∫₀¹ E‖(X₁ − X₀) − v(X_t, t)‖² dt along the Euler trajectory from noise.

    With `steps` Euler steps, X₁ − X₀ is the mean of the velocities v_i visited at t_i = i/steps, so S is their
    variance along the path: (1/steps)·Σ_i mean‖v_i − v̄‖², computed in one pass (Welford). ‖·‖² is the MEAN
    over elements (resolution independent), averaged over the batch. A straight (constant-in-time) flow gives 0.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"straightness needs an integer steps >= 1; got {steps!r}")
    f = _Counted(velocity)
    x, h = noise, 1.0 / steps
    mean_v, spread = torch.zeros_like(noise), torch.zeros_like(noise)
    for i in range(steps):
        v = f(x, i * h)
        delta = v - mean_v
        mean_v = mean_v + delta / (i + 1)
        spread = spread + delta * (v - mean_v)
        x = x + h * v
    return (spread / steps).mean().item()
