"""ODE solvers against closed-form solutions; straightness against hand-computed values."""

import math

import pytest
import torch

from slimflow.solvers import FIXED_STEP_METHODS, METHODS, solve, straightness

F64 = torch.float64
# Rotation with decay, scaled by a time-dependent rate: dx/dt = (1 + t)·A x  ⇒  x(t) = exp((t + t²/2)·A) x(0).
A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)


def linear_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 + t)[:, None] * (x @ A.T)


def exact(x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    elapsed = (t1 + t1**2 / 2) - (t0 + t0**2 / 2)
    return x @ torch.linalg.matrix_exp(elapsed * A).T


class Counting:
    """Wraps a velocity field and counts real calls."""

    def __init__(self, velocity):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.velocity(x, t)


@pytest.fixture
def x0() -> torch.Tensor:
    return torch.randn(16, 2, dtype=F64)


@pytest.mark.parametrize(
    "method,band",
    [
        ("euler", (1.8, 2.2)),
        ("heun", (3.5, 4.5)),
        ("midpoint", (3.5, 4.5)),
        ("rf_solver", (3.5, 4.5)),
    ],
)
def test_fixed_step_error_shrinks_at_the_method_order(x0, method, band):
    target = exact(x0, 0.0, 1.0)
    errors = [(solve(linear_field, x0, method, steps=n).x - target).abs().max().item() for n in (64, 128)]
    assert band[0] <= errors[0] / errors[1] <= band[1]


@pytest.mark.parametrize("method,per_step", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rf_solver", 2)])
def test_fixed_step_nfe_is_exact(x0, method, per_step):
    counted = Counting(linear_field)
    result = solve(counted, x0, method, steps=7)
    assert result.nfe == counted.calls == 7 * per_step


def test_dopri5_meets_tolerance_and_uses_fewer_nfe_when_looser(x0):
    target = exact(x0, 0.0, 1.0)
    nfe = {}
    for tol in (1e-4, 1e-7):
        counted = Counting(linear_field)
        result = solve(counted, x0, "dopri5", rtol=tol, atol=tol)
        assert result.nfe == counted.calls
        assert (result.x - target).abs().max().item() <= 5 * tol * (1 + target.abs().max().item())
        nfe[tol] = result.nfe
    assert nfe[1e-4] < nfe[1e-7]


def test_dopri5_ignores_steps(x0):
    with_steps = solve(linear_field, x0, "dopri5", steps=1, rtol=1e-6, atol=1e-6)
    without = solve(linear_field, x0, "dopri5", rtol=1e-6, atol=1e-6)
    assert torch.equal(with_steps.x, without.x) and with_steps.nfe == without.nfe


@pytest.mark.parametrize(
    "method,steps,tol",
    [
        ("euler", 400, 5e-2),
        ("heun", 100, 3e-3),
        ("midpoint", 100, 3e-3),
        ("rf_solver", 100, 3e-3),
        ("dopri5", None, 1e-6),
    ],
)
def test_backward_integration_inverts_forward(x0, method, steps, tol):
    # Backwards the decay becomes growth (×e^0.75), so these bounds are looser than the forward errors.
    kw = {"steps": steps, "rtol": 1e-8, "atol": 1e-8}
    backward = solve(linear_field, exact(x0, 0.0, 1.0), method, t_start=1.0, t_end=0.0, **kw)
    assert backward.times[0] == 1.0 and backward.times[-1] == 0.0
    assert all(a > b for a, b in zip(backward.times, backward.times[1:]))
    assert (backward.x - x0).abs().max().item() < tol
    roundtrip = solve(linear_field, solve(linear_field, x0, method, **kw).x, method, t_start=1.0, t_end=0.0, **kw)
    assert (roundtrip.x - x0).abs().max().item() < 2 * tol


@pytest.mark.parametrize("method", METHODS)
def test_return_path_shapes(x0, method):
    result = solve(linear_field, x0, method, steps=5, return_path=True, rtol=1e-4, atol=1e-4)
    assert len(result.path) == len(result.times) >= 2
    if method in FIXED_STEP_METHODS:
        assert len(result.path) == 6
        assert result.times == pytest.approx([i / 5 for i in range(6)])
    assert all(p.shape == x0.shape for p in result.path)
    assert result.path[0] is x0 and torch.equal(result.path[-1], result.x)
    assert result.times[0] == 0.0 and result.times[-1] == 1.0
    assert solve(linear_field, x0, method, steps=5).path is None


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method", METHODS)
def test_velocity_gets_a_batched_time_on_the_state_dtype(method, dtype):
    seen = []

    def field(x, t):
        seen.append((tuple(t.shape), t.dtype, t.device))
        return -x

    x = torch.randn(3, 4, 5, dtype=dtype)
    solve(field, x, method, steps=2, rtol=1e-3, atol=1e-3)
    assert set(seen) == {((3,), dtype, x.device)}


def test_gradients_flow_through_an_euler_step():
    weight = torch.tensor(2.0, requires_grad=True)
    x = torch.randn(4, 3)
    out = solve(lambda y, t: weight * y, x, "euler", steps=1).x  # x + weight·x
    out.sum().backward()
    assert weight.grad.item() == pytest.approx(x.sum().item(), rel=1e-6)


def test_bad_arguments_are_refused(x0):
    with pytest.raises(ValueError, match="choose one of euler, heun, midpoint, rf_solver, dopri5"):
        solve(linear_field, x0, "rk4", steps=4)
    for steps in (None, 0, 2.5, True):
        with pytest.raises(ValueError, match="steps >= 1"):
            solve(linear_field, x0, "heun", steps=steps)
    with pytest.raises(ValueError, match="rtol > 0 and atol > 0"):
        solve(linear_field, x0, "dopri5", rtol=0.0)
    with pytest.raises(ValueError, match="nothing to integrate"):
        solve(linear_field, x0, "euler", steps=3, t_start=0.5, t_end=0.5)
    with pytest.raises(ValueError, match="floating-point"):
        solve(linear_field, torch.ones(2, 2, dtype=torch.long), "euler", steps=1)
    with pytest.raises(RuntimeError, match="max_steps=3"):
        solve(linear_field, x0, "dopri5", rtol=1e-10, atol=1e-10, max_steps=3)
    with pytest.raises(RuntimeError, match="non-finite"):
        solve(lambda x, t: x * float("nan"), x0, "dopri5")
    with pytest.raises(RuntimeError, match="step size underflow"):
        solve(lambda x, t: x * torch.where(t[:, None] < 0.5, 1.0, float("nan")), x0, "dopri5")


def test_straightness_is_zero_for_straight_flows():
    noise = torch.randn(8, 3, dtype=F64)
    c = torch.randn(3, dtype=F64)
    assert straightness(lambda x, t: c.expand_as(x), noise, steps=20) == 0.0
    # v = x/(1 + t) has straight paths x_t = (1 + t)·x_0, and Euler follows them exactly: v_i = x_0 at every step.
    assert straightness(lambda x, t: x / (1 + t)[:, None], noise, steps=20) < 1e-25


def test_straightness_is_positive_for_a_curved_flow():
    assert straightness(linear_field, torch.randn(8, 2, dtype=F64), steps=50) > 0.1


def test_straightness_matches_a_hand_computed_value():
    # v = t·w (no x dependence): velocities t_i·w at t_i = i/N; their variance along the path is
    # Var_i(i/N)·w² = (N² − 1)/(12N²)·w², and the element mean of w² = (1 + 4 + 9)/3.
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    n = 10
    value = straightness(lambda x, t: t[:, None] * w, torch.randn(5, 3, dtype=F64), steps=n)
    assert value == pytest.approx((n * n - 1) / (12 * n * n) * 14 / 3, rel=1e-12)
    assert straightness(lambda x, t: t[:, None] * w, torch.randn(5, 3, dtype=F64), steps=1000) == pytest.approx(
        14 / 3 / 12, rel=1e-5
    )


def test_straightness_refuses_bad_steps():
    with pytest.raises(ValueError, match="steps >= 1"):
        straightness(linear_field, torch.randn(2, 2), steps=0)


def test_straightness_of_the_solved_euler_path_matches_its_definition():
    # S computed by hand from the path: mean over steps of mean‖(X₁ − X₀) − v(X_tᵢ, tᵢ)‖².
    noise, n = torch.randn(6, 2, dtype=F64), 16
    path = solve(linear_field, noise, "euler", steps=n, return_path=True).path
    chord = path[-1] - path[0]
    by_hand = (
        sum(
            ((chord - linear_field(p, torch.full((6,), i / n, dtype=F64))) ** 2).mean() for i, p in enumerate(path[:-1])
        )
        / n
    )
    assert straightness(linear_field, noise, steps=n) == pytest.approx(by_hand.item(), rel=1e-10)
    assert math.isfinite(by_hand.item())
