"""Inversion: images (t = 1) → noise (t = 0) by integrating a velocity field backwards, then regeneration.

RF-Solver (docs/methods.md, "Solvers") inverts with the same second-order step as it samples, time reversed; Euler is the
first-order baseline. Both directions use the same solver and step count, so the round-trip error measures the
discretisation error of the pair (an exact solver would give back the images).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from slimflow.solvers import ODESolution, solve

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NFE_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2, "rf_solver": 2}


@torch.no_grad()
def invert(velocity: Velocity, images: torch.Tensor, method: str = "rf_solver", steps: int = 25) -> ODESolution:
    """Noise for `images` (B, ...) in [-1, 1]: solve dx/dt = v from t = 1 back to t = 0."""
    return solve(velocity, images, method=method, steps=steps, t_start=1.0, t_end=0.0)


@torch.no_grad()
def reconstruct(velocity: Velocity, noise: torch.Tensor, method: str = "rf_solver", steps: int = 25) -> ODESolution:
    """Images regenerated from `noise`: solve dx/dt = v from t = 0 to t = 1."""
    return solve(velocity, noise, method=method, steps=steps, t_start=0.0, t_end=1.0)


def round_trip(
    velocity: Velocity, images: torch.Tensor, method: str, steps: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(noise, reconstruction, NFE of both directions) with the same method and steps each way."""
    inverted = invert(velocity, images, method, steps)
    rebuilt = reconstruct(velocity, inverted.x, method, steps)
    return inverted.x, rebuilt.x, inverted.nfe + rebuilt.nfe


def reconstruction_error_vs_nfe(
    velocity: Velocity,
    images: torch.Tensor,
    methods: Sequence[str] = ("euler", "rf_solver"),
    nfe_per_direction: Sequence[int] = (4, 8, 16, 32),
) -> list[dict]:
    """Rows {method, steps, nfe, mse}: round trip at equal NFE per direction for each method.

    `nfe` is the measured total of both directions; mse is the mean squared error over all elements.
    """
    for method in methods:
        if method not in NFE_PER_STEP:
            raise ValueError(f"method {method!r} has no fixed NFE per step; use one of {', '.join(NFE_PER_STEP)}")
    rows = []
    for budget in nfe_per_direction:
        for method in methods:
            steps, remainder = divmod(budget, NFE_PER_STEP[method])
            if steps < 1 or remainder:
                raise ValueError(
                    f"an NFE budget of {budget} per direction is not a whole number of {method} steps "
                    f"({NFE_PER_STEP[method]} NFE each)"
                )
            _, rebuilt, nfe = round_trip(velocity, images, method, steps)
            mse = (rebuilt - images).double().pow(2).mean().item()
            rows.append({"method": method, "steps": steps, "nfe": nfe, "mse": mse})
    return rows
