"""Rectified-flow maths: interpolant, time samplers, and the exact Gaussian 1-RF field (closed forms, Monte Carlo)."""

import math

import pytest
import torch
from torch import nn

from slimflow.flow import gaussian_rf_velocity, interpolate, sample_time, velocity_target
from slimflow.solvers import solve

F64 = torch.float64


def gaussian_data(dim: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = 4 * torch.rand(dim, generator=g, dtype=F64) - 2
    std = 0.3 + 1.2 * torch.rand(dim, generator=g, dtype=F64)
    return mean, std


def flow_matching_terms(n: int, mean: torch.Tensor, std: torch.Tensor):
    """Samples (x_t, t, v* = x − z) of the rectified-flow regression problem."""
    z = torch.randn(n, len(mean), dtype=F64)
    x = mean + std * torch.randn(n, len(mean), dtype=F64)
    t = torch.rand(n, dtype=F64)
    return interpolate(z, x, t), t, velocity_target(z, x)


# --- interpolant and target -------------------------------------------------------------------------------


def test_interpolate_broadcasts_over_image_dims_and_hits_the_endpoints():
    z, x = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 1.0, 0.25])
    xt = interpolate(z, x, t)
    assert xt.shape == x.shape
    assert torch.equal(xt[0], z[0]) and torch.equal(xt[1], x[1])
    assert torch.allclose(xt[2], 0.25 * x[2] + 0.75 * z[2])


def test_velocity_target_is_the_time_derivative_of_the_interpolant():
    z, x = torch.randn(5, 7, dtype=F64), torch.randn(5, 7, dtype=F64)
    t, dt = torch.rand(5, dtype=F64), 1e-3
    derivative = (interpolate(z, x, t + dt) - interpolate(z, x, t)) / dt
    assert torch.allclose(derivative, velocity_target(z, x), atol=1e-10)
    assert torch.equal(velocity_target(z, x), x - z)


def test_interpolate_refuses_mismatched_shapes():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(4,\)"):
        interpolate(z, z, torch.rand(4, 1))
    with pytest.raises(ValueError, match="same shape"):
        interpolate(z, torch.randn(4, 2), torch.rand(4))
    with pytest.raises(ValueError, match="same shape"):
        velocity_target(z, torch.randn(3, 3))


# --- time samplers ----------------------------------------------------------------------------------------


def test_uniform_times_stay_in_eps_one_and_are_uniform():
    t = sample_time(200_000, "uniform", eps=0.1)
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert t.min() >= 0.1 and t.max() <= 1.0
    se = 0.9 / math.sqrt(12 * len(t))
    assert abs(t.mean().item() - 0.55) < 5 * se


def test_time_sampler_is_reproducible_with_a_generator():
    for kind in ("uniform", "u_shaped", "logit_normal"):
        a = sample_time(64, kind, generator=torch.Generator().manual_seed(7))
        b = sample_time(64, kind, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b)


def test_u_shaped_histogram_matches_cosh_density():
    a, n, bins = 4.0, 1_000_000, 50
    t = sample_time(n, "u_shaped", a=a)
    assert t.min() >= torch.tensor(1e-5) and t.max() <= torch.tensor(1 - 1e-5)
    t = t.double()
    # p(t) = a·cosh(a(t − ½)) / (2 sinh(a/2)) on [0, 1]; CDF F(t) = (sinh(a(t − ½)) + sinh(a/2)) / (2 sinh(a/2)).
    edges = torch.linspace(0, 1, bins + 1, dtype=F64)
    cdf = (torch.sinh(a * (edges - 0.5)) + math.sinh(a / 2)) / (2 * math.sinh(a / 2))
    expected = n * cdf.diff()
    observed = torch.histc(t, bins=bins, min=0.0, max=1.0)
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    dof = bins - 1  # chi-square mean 49, sd ≈ 9.9: 49 + 6 sd ≈ 108
    assert chi2 < dof + 6 * math.sqrt(2 * dof)
    z = (observed - expected) / expected.sqrt()
    assert z.abs().max().item() < 5
    # The density is far from uniform: the end bins hold ≈ cosh(a/2) ≈ 3.8 times more than the middle ones.
    assert observed[0] > 3 * observed[bins // 2]


def test_logit_normal_mean_and_median():
    t = sample_time(400_000, "logit_normal", mean=0.0, std=1.0).double()
    assert abs(t.mean().item() - 0.5) < 5 * t.std().item() / math.sqrt(len(t))
    t = sample_time(400_000, "logit_normal", mean=1.0, std=0.5).double()
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=3e-3)
    # E[sigmoid(1 + 0.5·ε)], ε ~ N(0, 1), by quadrature on a fine grid.
    eps = torch.linspace(-10, 10, 200_001, dtype=F64)
    density = torch.exp(-(eps**2) / 2) / math.sqrt(2 * math.pi)
    expected = torch.trapezoid(torch.sigmoid(1 + 0.5 * eps) * density, eps).item()
    assert abs(t.mean().item() - expected) < 5 * t.std().item() / math.sqrt(len(t))


def test_time_sampler_refuses_bad_arguments():
    with pytest.raises(ValueError, match="choose one of uniform, u_shaped, logit_normal"):
        sample_time(4, "beta")
    with pytest.raises(ValueError, match="eps"):
        sample_time(4, "uniform", eps=1.0)
    with pytest.raises(ValueError, match="a > 0"):
        sample_time(4, "u_shaped", a=0.0)
    with pytest.raises(ValueError, match="std > 0"):
        sample_time(4, "logit_normal", std=0.0)
    with pytest.raises(ValueError, match="n >= 1"):
        sample_time(0)


# --- the exact Gaussian 1-RF field ------------------------------------------------------------------------


def test_gaussian_field_endpoints_and_trajectories_in_closed_form():
    mean, std = gaussian_data(3)
    x = torch.randn(6, 3, dtype=F64)
    assert torch.allclose(gaussian_rf_velocity(x, torch.zeros(6, dtype=F64), mean, std), mean - x)  # E[x₁] − z
    assert torch.allclose(gaussian_rf_velocity(x, torch.ones(6, dtype=F64), mean, std), x)  # x₁ − E[z] = x₁
    # x_t = t·m + sqrt(t²s² + (1 − t)²)·z solves the ODE: its time derivative equals the field along it.
    z, t, dt = torch.randn(6, 3, dtype=F64), torch.rand(6, dtype=F64), 1e-6

    def path(tt):
        return tt[:, None] * mean + torch.sqrt(tt[:, None] ** 2 * std**2 + (1 - tt[:, None]) ** 2) * z

    derivative = (path(t + dt) - path(t - dt)) / (2 * dt)
    assert torch.allclose(derivative, gaussian_rf_velocity(path(t), t, mean, std), atol=1e-8)


def test_gaussian_field_refuses_non_positive_std():
    with pytest.raises(ValueError, match="std > 0"):
        gaussian_rf_velocity(torch.randn(2, 2), torch.rand(2), 0.0, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("dim", [2, 8])
def test_exact_field_minimises_the_flow_matching_loss(dim):
    # For the conditional mean v*, L(v) − L(v*) = E‖v − v*‖² (mean over elements); check the sign with a margin
    # of 5 Monte-Carlo standard errors, and the size of the gap, on the same samples for every field.
    mean, std = gaussian_data(dim)
    xt, t, target = flow_matching_terms(200_000, mean, std)
    best = gaussian_rf_velocity(xt, t, mean, std)
    loss_best = ((target - best) ** 2).mean(dim=1)
    perturbed = {"scaled": 1.1 * best, "shifted": best + 0.1, "other_std": gaussian_rf_velocity(xt, t, mean, 1.2 * std)}
    for name, field in perturbed.items():
        gap = ((target - field) ** 2).mean(dim=1) - loss_best
        se = gap.std().item() / math.sqrt(len(gap))
        assert gap.mean().item() > 5 * se, name
        distance = ((field - best) ** 2).mean(dim=1)
        assert abs(gap.mean().item() - distance.mean().item()) < 5 * (gap - distance).std().item() / math.sqrt(
            len(gap)
        ), name


def test_briefly_trained_mlp_approaches_the_exact_field():
    # 200 Adam steps on the flow-matching loss bring a float32 MLP to < 6% of the zero field's (and of its own
    # initial) mean squared distance from the exact field; measured ≈ 2–3% over seeds.
    mean, std = gaussian_data(2)
    net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

    def model(x, t):
        return net(torch.cat([x, t[:, None]], dim=1).float()).double()

    xt_eval, t_eval, _ = flow_matching_terms(20_000, mean, std)
    exact = gaussian_rf_velocity(xt_eval, t_eval, mean, std)

    def distance_to_exact() -> float:
        with torch.no_grad():
            return ((model(xt_eval, t_eval) - exact) ** 2).mean().item()

    untrained, zero = distance_to_exact(), (exact**2).mean().item()
    optimiser = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(200):
        xt, t, target = flow_matching_terms(256, mean, std)
        loss = ((model(xt, t) - target) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    trained = distance_to_exact()
    assert trained < 0.06 * zero and trained < 0.06 * untrained, (trained, zero, untrained)


def test_dopri5_on_the_exact_field_pushes_noise_to_the_data_gaussian():
    mean, std = gaussian_data(8)
    n = 4000
    z = torch.randn(n, 8, dtype=F64)
    result = solve(lambda x, t: gaussian_rf_velocity(x, t, mean, std), z, "dopri5", rtol=1e-6, atol=1e-6)
    samples = result.x
    assert torch.allclose(samples.mean(0), mean, atol=5 * std.max().item() / math.sqrt(n))
    assert torch.allclose(samples.std(0), std, atol=5 * std.max().item() / math.sqrt(2 * n))
    # The 1-RF map of independent Gaussians is z ↦ m + s·z exactly.
    assert (samples - (mean + std * z)).abs().max().item() < 1e-4
