"""Pretrained diffusion and flow models as velocity fields v(x, t) in the project convention (t = 0 noise, t = 1 data).

Every teacher handled here noises data along a Gaussian path x = α·x0 + σ·ε (docs/methods.md, "Time convention"). Rescaling
the state by 1/(α + σ) turns any such path into the project's interpolant

    y = x / (α + σ) = t·x0 + (1 − t)·ε,   t = α / (α + σ)   (so α/σ = t/(1 − t), log-SNR λ = 2·logit t),

so one formula serves every teacher: with the network's estimates x̂0 = E[x0 | y] and ε̂ = E[ε | y] (which satisfy
y = t·x̂0 + (1 − t)·ε̂), the probability-flow ODE in project time is the rectified-flow velocity

    v(y, t) = x̂0 − ε̂ = (y − ε̂) / t = (x̂0 − y) / (1 − t).

The state is N(0, I) at t = 0 and the data at t = 1 exactly, the field of an exact predictor for Gaussian data
equals `slimflow.flow.gaussian_rf_velocity`, and an Euler step of it with the prediction held fixed is a DDIM
step. Per teacher family:

- VP diffusion (α² + σ² = 1; DDPM linear-β, cosine, diffusers tables): α = t/r, σ = (1 − t)/r,
  r = sqrt(t² + (1 − t)²); the network sees x = y/r at its own time s(t) (found from λ).
- EDM denoisers D(x; σ) (α = 1, x = x0 + σ·n): t = 1/(1 + σ), the network sees x = y·(1 + σ) and σ = (1 − t)/t;
  D is an x0-prediction. (Dividing by sqrt(1 + σ²) instead would give the VP form of the same process; dividing
  by 1 + σ gives the project's interpolant directly, with unit-variance noise at t = 0 all the same.)
- Flow models in reverse time (t' = 0 data, x_t' = (1 − t')·x + t'·z: minRF, rfpp, FLUX): the same state with
  t = 1 − t'; a velocity prediction v' = z − x gives v = −v'(y, 1 − t), an x-prediction x̂ gives (x̂ − y)/(1 − t).

Truncation: a network is trained on a range of noise levels only — t ∈ [t_min, t_max] of its schedule (linear VP
s ∈ [1e-3, 1]: t ∈ [0.0065, 0.9896]; DDPM 1000 steps: [0.0063, 0.9901]; cosine s ∈ [1e-3, 0.999]:
[0.0016, 0.9936]; EDM σ ∈ [0.002, 80]: [0.0123, 0.9980]).
Outside it the field is held at the boundary value. The exact field varies smoothly there (at t = 0 it is
E[x0] − z), so holding it costs O(t_min²) at the noise end and O((1 − t_max)²·|∂v/∂t|) at the data end; holding
it over [t_max, 1] is exactly DDIM's final jump to x̂0. Divisions by t or 1 − t are guarded the same way
(t ∈ [1e-3, 1 − 1e-3] when the schedule itself allows 0 or 1, e.g. reverse-time x-prediction flows).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimflow.checkpoint import CheckpointError, load_torch_file
from slimflow.flow import per_sample
from teachers.unet import check_labels

PREDICTIONS = {  # which network outputs each kind of path supports
    "vp": ("epsilon", "sample", "v_prediction"),
    "ve": ("epsilon", "sample"),
    "reverse_flow": ("velocity", "sample", "epsilon"),
}
DIVISION_GUARD = 1e-3  # keeps t away from 0 (ε-prediction) and 1 (x-prediction) where v divides by t or 1 − t


@dataclass(frozen=True)
class NoiseSchedule:
    """A teacher's Gaussian path in project time: its kind, the trained range [t_min, t_max] and the time input.

    kind: "vp" (α² + σ² = 1), "ve" (α = 1, EDM) or "reverse_flow" (α + σ = 1, network time 1 − t).
    network_time(t) -> the time/noise value the network is called with, for t (B,) inside [t_min, t_max].
    """

    name: str
    kind: str
    t_min: float
    t_max: float
    network_time: Callable[[torch.Tensor], torch.Tensor]


def log_snr(t: torch.Tensor) -> torch.Tensor:
    """λ = log(α²/σ²) = 2·logit(t) of the project-time state y = t·x0 + (1 − t)·ε."""
    return 2.0 * (torch.log(t) - torch.log1p(-t))


def vp_time(alpha_bar: float) -> float:
    """Project time t = α/(α + σ) of a VP noise level ᾱ = α² (σ² = 1 − ᾱ)."""
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return alpha / (alpha + sigma)


def vp_linear(beta_min: float = 0.1, beta_max: float = 20.0, s_min: float = 1e-3, s_max: float = 1.0) -> NoiseSchedule:
    """Continuous linear-β VP SDE (score_sde): ᾱ(s) = exp(−½·s²·(β_max − β_min) − s·β_min); network time s ∈ [0, 1]."""
    if not beta_max > beta_min > 0 or not 0 <= s_min < s_max <= 1:
        raise ValueError(
            f"vp_linear needs beta_max > beta_min > 0 and 0 <= s_min < s_max <= 1, got "
            f"beta_min={beta_min}, beta_max={beta_max}, s_min={s_min}, s_max={s_max}"
        )
    spread = beta_max - beta_min

    def alpha_bar(s: float) -> float:
        return math.exp(-0.5 * spread * s * s - beta_min * s)

    def network_time(t: torch.Tensor) -> torch.Tensor:
        neg_log_alpha_bar = nn.functional.softplus(-log_snr(t))  # −log sigmoid(λ)
        return (torch.sqrt(beta_min**2 + 2.0 * spread * neg_log_alpha_bar) - beta_min) / spread

    return NoiseSchedule(
        f"vp_linear(beta_min={beta_min}, beta_max={beta_max})",
        "vp",
        vp_time(alpha_bar(s_max)),
        vp_time(alpha_bar(s_min)),
        network_time,
    )


def cosine_alpha_bar(s: float, offset: float = 0.008) -> float:
    """Nichol & Dhariwal's ᾱ(s) ∝ cos²(π/2·(s + offset)/(1 + offset)), normalised to ᾱ(0) = 1."""
    return (math.cos(math.pi / 2 * (s + offset) / (1 + offset)) / math.cos(math.pi / 2 * offset / (1 + offset))) ** 2


def vp_cosine(s_min: float = 1e-3, s_max: float = 0.999, offset: float = 0.008) -> NoiseSchedule:
    """Continuous cosine VP schedule; network time s ∈ [0, 1]. ᾱ(1) = 0, so s_max < 1 bounds the noise end."""
    if not 0 <= s_min < s_max < 1:
        raise ValueError(
            f"vp_cosine needs 0 <= s_min < s_max < 1 (ᾱ(1) = 0 has no finite log-SNR), got s_min={s_min}, s_max={s_max}"
        )
    cos0 = math.cos(math.pi / 2 * offset / (1 + offset))

    def network_time(t: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(log_snr(t)).sqrt()
        return (1 + offset) * (2 / math.pi) * torch.arccos((alpha * cos0).clamp(max=1.0)) - offset

    return NoiseSchedule(
        f"vp_cosine(offset={offset})",
        "vp",
        vp_time(cosine_alpha_bar(s_max, offset)),
        vp_time(cosine_alpha_bar(s_min, offset)),
        network_time,
    )


def ddpm_betas(
    beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Discrete β_k as diffusers builds them: "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine, β ≤ 0.999)."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        ratios = [cosine_alpha_bar((k + 1) / n) / cosine_alpha_bar(k / n) for k in range(n)]
        return torch.tensor([min(1.0 - r, 0.999) for r in ratios], dtype=torch.float64)
    raise ValueError(
        f"unsupported beta_schedule {beta_schedule!r}: use 'linear', 'scaled_linear' or "
        "'squaredcos_cap_v2', or give the betas themselves (trained_betas)"
    )


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of fp(xp) at x (xp increasing, x inside [xp[0], xp[-1]])."""
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    w = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


def vp_discrete(betas: torch.Tensor) -> NoiseSchedule:
    """Discrete DDPM schedule: ᾱ_k = ∏_{i<=k}(1 − β_i), network time = timestep k ∈ [0, N − 1].

    Between table entries the timestep is interpolated linearly in log-SNR (fractional timesteps; a network with
    a sinusoidal time embedding accepts them).
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f"vp_discrete needs a 1-D table of at least 2 betas in (0, 1), got shape {tuple(betas.shape)}")
    alpha_bar = torch.cumprod(1.0 - betas, 0)
    lam = (alpha_bar.log() - torch.log1p(-alpha_bar)).flip(0)  # increasing
    steps = torch.arange(len(betas) - 1, -1, -1, dtype=torch.float64)

    def network_time(t: torch.Tensor) -> torch.Tensor:
        return _interp(log_snr(t), lam.to(t), steps.to(t))

    return NoiseSchedule(
        f"vp_discrete({len(betas)} steps)",
        "vp",
        vp_time(float(alpha_bar[-1])),
        vp_time(float(alpha_bar[0])),
        network_time,
    )


def edm(sigma_min: float = 0.002, sigma_max: float = 80.0) -> NoiseSchedule:
    """EDM / VE path x = x0 + σ·n (Karras et al.): t = 1/(1 + σ); the network is called with σ = (1 − t)/t."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"edm needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return NoiseSchedule(
        f"edm(sigma_min={sigma_min}, sigma_max={sigma_max})",
        "ve",
        1.0 / (1.0 + sigma_max),
        1.0 / (1.0 + sigma_min),
        lambda t: (1.0 - t) / t,
    )


def reverse_flow(time_scale: float = 1.0) -> NoiseSchedule:
    """Flow model with t' = 0 data, t' = 1 noise (minRF, rfpp, FLUX); called with t'·time_scale, t' = 1 − t."""
    return NoiseSchedule(
        f"reverse_flow(time_scale={time_scale})", "reverse_flow", 0.0, 1.0, lambda t: (1.0 - t) * time_scale
    )


class TeacherVelocity(nn.Module):
    """A pretrained network as the velocity field `v(x, t)` of the project (see the module docstring).

    network(x_native, time) -> prediction of x_native's shape; `prediction` names what it predicts, with diffusers'
    names: "epsilon" (ε̂), "sample" (x̂0; EDM denoisers), "v_prediction" (α·ε − σ·x0, VP only), and "velocity"
    (reverse-time flow velocity z − x).
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        schedule: NoiseSchedule,
        prediction: str,
        sample_shape: tuple[int, ...] | None = None,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)  # > 0: a class-conditional network, called network(x, time, labels)
        allowed = PREDICTIONS.get(schedule.kind)
        if allowed is None:
            raise ValueError(f"unknown schedule kind {schedule.kind!r}; kinds: {', '.join(PREDICTIONS)}")
        if prediction not in allowed:
            raise ValueError(
                f"prediction {prediction!r} is not defined for a {schedule.kind} teacher "
                f"({schedule.name}); use one of {', '.join(allowed)}"
            )
        self.network = network
        self.schedule = schedule
        self.prediction = prediction
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        divides_by_t, divides_by_1_minus_t = prediction == "epsilon", prediction in ("sample", "v_prediction")
        self.t_lo = max(schedule.t_min, DIVISION_GUARD if divides_by_t else 0.0)
        self.t_hi = min(schedule.t_max, 1.0 - DIVISION_GUARD if divides_by_1_minus_t else 1.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = check_labels(labels, self.num_classes, x.shape[0], x.device)
        if not torch.is_tensor(t) or t.shape != (x.shape[0],):
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(
                f"teacher velocity expects t of shape ({x.shape[0]},) for x of shape {tuple(x.shape)}, got {shape}"
            )
        if self.sample_shape is not None and tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"teacher expects samples of shape (B, {', '.join(map(str, self.sample_shape))}), got {tuple(x.shape)}"
            )
        dtype = torch.promote_types(x.dtype, torch.float32)
        tc = t.to(dtype).clamp(self.t_lo, self.t_hi)
        scale = self._state_scale(tc)  # α + σ
        extra = () if labels is None else (labels,)
        out = self.network(x * per_sample(scale, x), self.schedule.network_time(tc), *extra)
        if out.shape != x.shape:
            raise ValueError(f"teacher network returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        te = per_sample(tc, x)
        if self.prediction == "velocity":
            return -out
        if self.prediction == "epsilon":
            return (x - out) / te
        if self.prediction == "v_prediction":  # x0 = α·x_native − σ·v with α = t·scale, σ = (1 − t)·scale
            s = per_sample(scale, x)
            out = (te * s) * (x * s) - ((1 - te) * s) * out
        return (out - x) / (1 - te)

    def _state_scale(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule.kind == "vp":
            return torch.rsqrt(t * t + (1 - t) * (1 - t))
        if self.schedule.kind == "ve":
            return 1.0 / t
        return torch.ones_like(t)


# ------------------------------------------------------------------------------------------------- diffusers
DDPM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}
VP_SCHEDULERS = {
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
}


class DiffusersUNet(nn.Module):
    """`UNet2DModel` called as network(x, timestep) -> tensor, or network(x, timestep, labels) when it has a class
    embedding (`num_class_embeds`, class_embed_type None: an nn.Embedding added to the time embedding)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None and not (torch.jit.is_tracing() or torch.compiler.is_compiling()) and (labels < 0).any():
            raise ValueError(
                "this diffusers UNet2DModel's class embedding has no 'no label' class (NO_LABEL = -1): "
                "classifier-free guidance is not available for it"
            )
        return self.unet(x, timestep, class_labels=labels).sample


def diffusers_layout(folder: str | Path) -> tuple[Path, Path | None]:
    """(UNet folder, scheduler_config.json or None) of a UNet2DModel folder or a pipeline folder (unet/, scheduler/)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no diffusers folder at {str(folder)!r}")
    for unet_dir, scheduler in (
        (folder, folder / "scheduler_config.json"),
        (folder / "unet", folder / "scheduler" / "scheduler_config.json"),
    ):
        if (unet_dir / "config.json").is_file():
            return unet_dir, scheduler if scheduler.is_file() else None
    raise FileNotFoundError(
        f"{str(folder)!r} is not a diffusers model folder: neither config.json nor unet/config.json is there"
    )


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err})") from None


def diffusers_schedule(config: dict) -> tuple[NoiseSchedule, str]:
    """(schedule, prediction) from a diffusers scheduler config (missing keys take DDPMScheduler's defaults)."""
    name = config.get("_class_name")
    if name is not None and name not in VP_SCHEDULERS:
        raise ValueError(
            f"scheduler {name!r} is not a VP (DDPM-family) scheduler; supported: {', '.join(sorted(VP_SCHEDULERS))}"
        )
    if config.get("rescale_betas_zero_snr"):
        raise ValueError(
            "rescale_betas_zero_snr=True gives ᾱ = 0 at the last timestep (infinite log-SNR); "
            "such schedules are not supported"
        )
    cfg = {**DDPM_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    betas = cfg.get("trained_betas")
    if betas is None:
        betas = ddpm_betas(cfg["beta_schedule"], cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"])
    prediction = cfg["prediction_type"]
    if prediction not in PREDICTIONS["vp"]:
        raise ValueError(f"scheduler prediction_type {prediction!r} is not one of {', '.join(PREDICTIONS['vp'])}")
    return vp_discrete(torch.as_tensor(betas, dtype=torch.float64)), prediction


def load_diffusers_teacher(folder: str | Path, scheduler_config: str | Path | dict | None = None) -> TeacherVelocity:
    """A diffusers `UNet2DModel` folder (or a pipeline folder with unet/ and scheduler/) as a teacher velocity.

    The schedule and prediction type come from `scheduler_config` (a dict or a JSON path), else from the folder's
    scheduler_config.json, else DDPM's defaults (1000 linear betas 1e-4..0.02, ε-prediction; a warning says so).
    Loads local files only, on the CPU, in eval mode; needs the optional extra `diffusers`.
    """
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ImportError(
            "loading a diffusers folder needs the optional extra: pip install 'slimflow[diffusers]'"
        ) from None
    unet_dir, found = diffusers_layout(folder)
    config = read_json(unet_dir / "config.json")
    if config.get("_class_name") != "UNet2DModel":
        raise ValueError(
            f"{str(unet_dir / 'config.json')!r} describes a {config.get('_class_name')!r}; "
            "only unconditional UNet2DModel teachers and class-conditional ones (num_class_embeds) are supported"
        )
    if config.get("class_embed_type"):
        raise ValueError(
            f"{str(unet_dir)!r} is a UNet2DModel with class_embed_type {config['class_embed_type']!r}; only the "
            "class-index embedding (num_class_embeds, class_embed_type null) is supported"
        )
    classes = int(config.get("num_class_embeds") or 0)
    if isinstance(scheduler_config, dict):
        sched = scheduler_config
    elif scheduler_config is not None or found is not None:
        path = Path(scheduler_config if scheduler_config is not None else found)
        if not path.is_file():
            raise FileNotFoundError(f"no scheduler config at {str(path)!r}")
        sched = read_json(path)
    else:
        warnings.warn(
            f"{str(folder)!r} has no scheduler_config.json: using DDPM defaults {DDPM_DEFAULTS}", stacklevel=2
        )
        sched = {}
    schedule, prediction = diffusers_schedule(sched)
    if not list(unet_dir.glob("diffusion_pytorch_model*.safetensors")):
        for weights in unet_dir.glob("diffusion_pytorch_model*.bin"):
            load_torch_file(weights)  # the project's policy first: a .bin that pickles code is refused here
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"diffusers could not load {str(unet_dir)!r}: {str(err).splitlines()[0][:300]}") from None
    size, shape = config.get("sample_size"), None
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        shape = (int(config.get("in_channels", 3)), int(height), int(width))
    teacher = TeacherVelocity(DiffusersUNet(unet), schedule, prediction, shape, classes)
    return teacher.eval().requires_grad_(False)
