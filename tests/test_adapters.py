"""Teacher adapters: diffusion (VP ε/x0/v), EDM and reverse-time flow teachers as project-convention velocities.

Closed forms (data x0 ~ N(μ, diag(s²)) per dimension, noise ε ~ N(0, I), x = α·x0 + σ·ε):
    Var[x] = α²s² + σ²,  E[ε | x] = σ·(x − αμ)/Var[x],  E[x0 | x] = μ + α·s²·(x − αμ)/Var[x].
The exact predictors below implement these in each teacher's own time variable; the adapter must turn them into
`slimflow.flow.gaussian_rf_velocity`, and its ODE must map N(0, I) to N(μ, diag(s²)).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimflow.flow import gaussian_rf_velocity
from slimflow.solvers import solve
from teachers.adapters import (
    TeacherVelocity,
    ddpm_betas,
    edm,
    reverse_flow,
    vp_cosine,
    vp_discrete,
    vp_linear,
    vp_time,
)

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
STD = torch.tensor([0.5, 1.5], dtype=torch.float64)


def posterior(alpha: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[x0 | x], E[ε | x]) for x = α·x0 + σ·ε with Gaussian data (α, σ of shape (B,))."""
    a, s = alpha[:, None], sigma[:, None]
    centred = (x - a * MU) / (a * a * STD**2 + s * s)
    return MU + a * STD**2 * centred, s * centred


def linear_alpha_bar(s: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * (20.0 - 0.1) * s * s - 0.1 * s)


def cosine_alpha_bar(s: torch.Tensor) -> torch.Tensor:
    f = lambda u: torch.cos(math.pi / 2 * (u + 0.008) / 1.008) ** 2  # noqa: E731
    return f(s) / f(torch.zeros_like(s))


def discrete_alpha_bar(k: torch.Tensor) -> torch.Tensor:
    """ᾱ at fractional DDPM timestep k: log-SNR linear between the integer timesteps of the 1000-step table."""
    table = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    lam = torch.log(table / (1 - table))
    lo = k.floor().long().clamp(0, 998)
    return torch.sigmoid(lam[lo] + (k - lo) * (lam[lo + 1] - lam[lo]))


def vp_network(alpha_bar_of, output: str):
    def network(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        ab = alpha_bar_of(time)
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        x0, eps = posterior(alpha, sigma, x)
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha[:, None] * eps - sigma[:, None] * x0}[output]

    return network


def edm_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact D(x; σ) = E[x0 | x0 + σ·n = x]."""
    return posterior(torch.ones_like(sigma), sigma, x)[0]


def reverse_flow_network(output: str):
    """Exact reverse-time flow teacher: x_t' = (1 − t')·x0 + t'·z; predicts z − x0 ("velocity") or x0 ("sample")."""

    def network(x: torch.Tensor, t_rev: torch.Tensor) -> torch.Tensor:
        x0, z = posterior(1 - t_rev, t_rev, x)
        return z - x0 if output == "velocity" else x0

    return network


TEACHERS = {
    "vp_linear-epsilon": lambda: TeacherVelocity(vp_network(linear_alpha_bar, "epsilon"), vp_linear(), "epsilon"),
    "vp_linear-sample": lambda: TeacherVelocity(vp_network(linear_alpha_bar, "sample"), vp_linear(), "sample"),
    "vp_linear-v": lambda: TeacherVelocity(vp_network(linear_alpha_bar, "v_prediction"), vp_linear(), "v_prediction"),
    "vp_cosine-epsilon": lambda: TeacherVelocity(vp_network(cosine_alpha_bar, "epsilon"), vp_cosine(), "epsilon"),
    "ddpm1000-epsilon": lambda: TeacherVelocity(
        vp_network(discrete_alpha_bar, "epsilon"), vp_discrete(ddpm_betas()), "epsilon"
    ),
    "edm-denoiser": lambda: TeacherVelocity(edm_denoiser, edm(), "sample"),
    "reverse_flow-velocity": lambda: TeacherVelocity(reverse_flow_network("velocity"), reverse_flow(), "velocity"),
    "reverse_flow-sample": lambda: TeacherVelocity(reverse_flow_network("sample"), reverse_flow(), "sample"),
}


def whitened_noise(n: int) -> torch.Tensor:
    """N(0, I) draws made exactly zero-mean with identity covariance, so sample moments test the map alone."""
    z = torch.randn(n, 2, dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (n - 1))
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


@pytest.mark.parametrize("name", TEACHERS)
def test_converted_field_equals_the_exact_rf_velocity_inside_the_trained_range(name):
    teacher = TEACHERS[name]()
    y = 2 * torch.randn(64, 2, dtype=torch.float64)
    for t in torch.linspace(teacher.t_lo, teacher.t_hi, 9, dtype=torch.float64):
        tb = t.expand(64)
        torch.testing.assert_close(teacher(y, tb), gaussian_rf_velocity(y, tb, MU, STD), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "method, steps, tol",
    [("euler", 200, 0.05), ("heun", 40, 1.5e-3), ("rf_solver", 40, 1.5e-3), ("dopri5", None, 1.5e-3)],
)
@pytest.mark.parametrize("name", TEACHERS)
def test_adapter_ode_maps_standard_noise_to_the_gaussian_data(name, method, steps, tol):
    """Mean and covariance of the ODE's samples match N(μ, diag(s²)); truncation to [t_min, t_max] included.

    Measured here: Euler (200 steps) errs by ≈ 0.03 in covariance and map, the others by ≤ 7e-4 (of which up to
    6e-4 is EDM's truncation at σ_max = 80).
    """
    z = whitened_noise(512)
    x = solve(TEACHERS[name](), z, method=method, steps=steps, rtol=1e-6, atol=1e-6).x
    torch.testing.assert_close(x.mean(0), MU, rtol=0, atol=tol)
    torch.testing.assert_close(torch.cov(x.T), torch.diag(STD**2), rtol=0, atol=tol)
    assert (x - (MU + STD * z)).abs().max() < tol  # the exact flow map is z -> μ + s·z


def test_vp_linear_truncation_and_time_mapping():
    schedule = vp_linear()
    s = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    alpha, sigma = linear_alpha_bar(s).sqrt(), (1 - linear_alpha_bar(s)).sqrt()
    t = alpha / (alpha + sigma)
    torch.testing.assert_close(schedule.network_time(t), s)
    assert schedule.t_min == pytest.approx(float(t[-1])) and schedule.t_min < 0.0066  # α(1) ≈ 0.0066: start ≈ N(0, I)
    assert schedule.t_max == pytest.approx(float(t[0]))


def test_ddpm_timestep_mapping_hits_every_integer_timestep():
    betas = ddpm_betas("linear", 1000, 1e-4, 0.02)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert alpha_bar[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    schedule = vp_discrete(betas)
    k = torch.tensor([0, 1, 17, 500, 998, 999])
    t = torch.tensor([vp_time(float(alpha_bar[i])) for i in k], dtype=torch.float64)
    torch.testing.assert_close(schedule.network_time(t), k.double(), rtol=0, atol=1e-9)
    assert (schedule.t_min, schedule.t_max) == (pytest.approx(float(t[-1])), pytest.approx(float(t[0])))


def test_cosine_betas_follow_the_capped_cosine_alpha_bar():
    betas = ddpm_betas("squaredcos_cap_v2", 1000)
    assert betas.max() == pytest.approx(0.999) and len(betas) == 1000
    alpha_bar = torch.cumprod(1 - betas, 0)
    k = torch.tensor([0, 250, 500, 750], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar[k.long()], cosine_alpha_bar((k + 1) / 1000), rtol=1e-6, atol=0)


def test_field_is_held_at_the_boundary_outside_the_trained_range():
    teacher = TEACHERS["edm-denoiser"]()
    y = torch.randn(8, 2, dtype=torch.float64)
    at = lambda t: teacher(y, torch.full((8,), t, dtype=torch.float64))  # noqa: E731
    torch.testing.assert_close(at(0.0), at(teacher.t_lo))
    torch.testing.assert_close(at(1.0), at(teacher.t_hi))
    assert teacher.t_lo == pytest.approx(1 / 81) and teacher.t_hi == pytest.approx(1 / 1.002)


def test_x_prediction_flow_guards_the_division_at_t_equal_1():
    teacher = TEACHERS["reverse_flow-sample"]()
    v = teacher(torch.randn(4, 2, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    assert torch.isfinite(v).all() and teacher.t_hi == pytest.approx(1 - 1e-3)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="'v_prediction' is not defined for a ve teacher"):
        TeacherVelocity(edm_denoiser, edm(), "v_prediction")
    with pytest.raises(ValueError, match="prediction 'score'"):
        TeacherVelocity(edm_denoiser, edm(), "score")
    teacher = TeacherVelocity(edm_denoiser, edm(), "sample", sample_shape=(2,))
    with pytest.raises(ValueError, match=r"t of shape \(4,\)"):
        teacher(torch.randn(4, 2), torch.rand(4, 1))
    with pytest.raises(ValueError, match=r"t of shape \(4,\)"):
        teacher(torch.randn(4, 2), 0.5)
    with pytest.raises(ValueError, match=r"samples of shape \(B, 2\)"):
        teacher(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match="returned shape"):
        TeacherVelocity(lambda x, s: x[:, :1], edm(), "sample")(torch.randn(4, 2), torch.rand(4))
    with pytest.raises(ValueError, match="unsupported beta_schedule 'sigmoidal'"):
        ddpm_betas("sigmoidal")
    with pytest.raises(ValueError, match="s_max < 1"):
        vp_cosine(s_max=1.0)
    with pytest.raises(ValueError, match="beta_max > beta_min"):
        vp_linear(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        edm(sigma_min=80, sigma_max=0.002)
    with pytest.raises(ValueError, match="betas in"):
        vp_discrete(torch.tensor([0.1, 1.5]))


# ------------------------------------------------------------------------------------------------- diffusers
def tiny_unet_folder(root, prediction_type: str | None, layout: str = "flat"):
    diffusers = pytest.importorskip("diffusers", reason="optional extra 'diffusers' is not installed")
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    flat = layout == "flat"
    unet.save_pretrained(root if flat else root / "unet")
    if not flat:
        (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    if prediction_type is not None:
        scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
        scheduler.save_pretrained(root if flat else root / "scheduler")
    return unet.eval(), root


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_folder_matches_the_unet_and_makes_pairs(tmp_path, prediction_type):
    from slimflow.pairs import PairStore, generate_pairs
    from teachers.adapters import load_diffusers_teacher

    unet, folder = tiny_unet_folder(tmp_path / "teacher", prediction_type)
    teacher = load_diffusers_teacher(folder)
    assert teacher.prediction == prediction_type and teacher.sample_shape == (1, 8, 8)
    # at the project time of diffusion timestep k the adapter calls the UNet on (x·(α+σ), k) and converts
    import diffusers

    alpha_bar = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    k = 600
    alpha, sigma = alpha_bar[k].sqrt(), (1 - alpha_bar[k]).sqrt()
    t = alpha / (alpha + sigma)
    y = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out = unet(y * (alpha + sigma).float(), torch.full((3,), float(k))).sample.double()
        x_native = (y * (alpha + sigma)).double()
        eps = out if prediction_type == "epsilon" else sigma * x_native + alpha * out
        x0 = (x_native - sigma * eps) / alpha
        got = teacher(y, torch.full((3,), float(t))).double()
    torch.testing.assert_close(got, x0 - eps, rtol=1e-3, atol=1e-3)

    summary = generate_pairs(
        teacher,
        tmp_path / "pairs",
        n=6,
        shape=(1, 8, 8),
        seed=0,
        solver={"method": "rf_solver", "steps": 3},
        shard_size=4,
        batch_size=3,
        progress=False,
    )
    noise, images = PairStore(tmp_path / "pairs").get(range(6))
    assert images.shape == (6, 1, 8, 8) and torch.isfinite(images).all() and summary
    assert (images - noise).abs().mean() > 0.01  # the teacher moved the noise


def test_diffusers_pipeline_layout_and_missing_scheduler(tmp_path):
    from teachers.adapters import load_diffusers_teacher

    _, pipeline = tiny_unet_folder(tmp_path / "pipe", "sample", layout="pipeline")
    assert load_diffusers_teacher(pipeline).prediction == "sample"
    _, bare = tiny_unet_folder(tmp_path / "bare", None)
    with pytest.warns(UserWarning, match="using DDPM defaults"):
        teacher = load_diffusers_teacher(bare)
    assert teacher.prediction == "epsilon" and teacher.schedule.t_min == pytest.approx(vp_time(4.036e-5), rel=1e-3)
    x = solve(teacher, torch.randn(2, 1, 8, 8), "euler", 3).x
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"samples of shape \(B, 1, 8, 8\)"):
        teacher(torch.randn(2, 3, 8, 8), torch.rand(2))


def test_diffusers_bad_folders(tmp_path):
    pytest.importorskip("diffusers", reason="optional extra 'diffusers' is not installed")
    from teachers.adapters import load_diffusers_teacher

    with pytest.raises(FileNotFoundError, match="no diffusers folder"):
        load_diffusers_teacher(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither config.json nor unet/config.json"):
        load_diffusers_teacher(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="only unconditional UNet2DModel"):
        load_diffusers_teacher(other)
    _, folder = tiny_unet_folder(tmp_path / "ve", None)
    with pytest.raises(ValueError, match="not a VP"):
        load_diffusers_teacher(folder, scheduler_config={"_class_name": "ScoreSdeVeScheduler"})
    with pytest.raises(FileNotFoundError, match="no scheduler config"):
        load_diffusers_teacher(folder, scheduler_config=tmp_path / "nope.json")
