"""Rectified-flow maths: interpolant, velocity target, time samplers, the flow-matching batch, reproducible noise
and the exact Gaussian 1-RF field.

Convention (docs/methods.md, "Time convention"): t = 0 is noise z ~ N(0, I), t = 1 is data x;
x_t = t·x + (1 − t)·z; v* = x − z.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

TIME_SAMPLERS = ("uniform", "u_shaped", "logit_normal")
U_SHAPED_CLAMP = 1e-5
NOISE_SCHEME = "mt19937(fmix32(blake2b32(seed) + index)) randn float64 -> float32"
_MASK32 = 0xFFFFFFFF


def per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t of shape (B,) viewed as (B, 1, ..., 1) so it broadcasts over the non-batch dims of `like`."""
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({like.shape[0]},) to match the batch; got {tuple(t.shape)}")
    return t.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def interpolate(noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t·data + (1 − t)·noise, with t of shape (B,) broadcast over the remaining dims."""
    if noise.shape != data.shape:
        raise ValueError(f"noise and data must have the same shape; got {tuple(noise.shape)} and {tuple(data.shape)}")
    tb = per_sample(t, data)
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
        raise ValueError(
            "gaussian_rf_velocity needs std > 0 in every dimension (the field is singular at t = 1 otherwise)"
        )
    tb = per_sample(t, x)
    var = s * s
    gain = (tb * var - (1 - tb)) / (tb * tb * var + (1 - tb) ** 2)
    return m + gain * (x - tb * m)


def flow_matching_batch(noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> dict:
    """Inputs and target of the rectified-flow loss: x_t, t and v* = x − z."""
    return {"x_t": interpolate(noise, data, t), "t": t, "target": velocity_target(noise, data)}


def random_hflip(images: torch.Tensor, generator: torch.Generator, *others: torch.Tensor) -> list[torch.Tensor]:
    """Flip each sample left-right with probability ½ (drawn from `generator`); the same flip is applied to every
    tensor given."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return [torch.where(flip.view(-1, *[1] * (t.dim() - 1)), t.flip(-1), t) for t in (images, *others)]


# ------------------------------------------------------------------------------------------------- noise
def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2^32) that scatters neighbouring integers."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _seed_base(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    digest = hashlib.blake2b(str(seed).encode(), digest_size=4, person=b"slimflow-noise").digest()
    return int.from_bytes(digest, "little")


def noise_seed(seed: int, index: int) -> int:
    """Generator seed of pair `index`: fmix32((blake2b-32(str(seed)) + index) mod 2^32).

    torch's CPU generator keeps only 32 bits of a seed, so the seed is a 32-bit bijection of the index: no two pairs
    of one store (index < 2^32) share a noise stream.
    """
    return _fmix32((_seed_base(seed) + index) & _MASK32)


def _as_indices(indices: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    idx = torch.as_tensor(indices)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"pair indices must be integers, got dtype {idx.dtype}")
    return idx.reshape(-1).to(device="cpu", dtype=torch.long)


def noise_for(
    indices: int | Sequence[int] | torch.Tensor,
    seed: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The noise of pairs `indices` (B, *shape), bit-exact from (seed, index) alone (see the module docstring)."""
    idx = _as_indices(indices)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) > _MASK32):
        raise ValueError(f"pair indices must lie in [0, 2^32), got min {int(idx.min())}, max {int(idx.max())}")
    shape = tuple(int(s) for s in shape)
    base = _seed_base(seed)
    out = torch.empty((len(idx), *shape), dtype=torch.float32)
    draw = torch.empty(shape, dtype=torch.float64)
    generator = torch.Generator()
    for row, index in enumerate(idx.tolist()):
        generator.manual_seed(_fmix32((base + index) & _MASK32))
        out[row].copy_(torch.randn(shape, generator=generator, out=draw))  # rounds to nearest float32
    return out.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------ labels
LABEL_SCHEME = "fmix32(fmix32(blake2b32(seed) + index) ^ 0x5bd1e995) mod num_classes"
_LABEL_SALT = 0x5BD1E995


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return num_classes


def labels_for(indices: int | Sequence[int] | torch.Tensor, seed: int, num_classes: int) -> torch.Tensor:
    """The class labels of pairs `indices` (int64, (B,)), bit-exact from (seed, index) alone like their noise:
    fmix32(noise_seed(seed, index) ^ salt) mod num_classes (`LABEL_SCHEME`; the salt keeps them apart from the
    noise stream, the modulo bias is < 10⁻⁸ for any class count below 100)."""
    _check_num_classes(num_classes)
    idx = _as_indices(indices)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) > _MASK32):
        raise ValueError(f"pair indices must lie in [0, 2^32), got min {int(idx.min())}, max {int(idx.max())}")
    base = _seed_base(seed)
    out = [_fmix32(_fmix32((base + i) & _MASK32) ^ _LABEL_SALT) % num_classes for i in idx.tolist()]
    return torch.tensor(out, dtype=torch.long).reshape(len(idx))


def balanced_labels(indices: int | Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class-balanced labels: sample i is of class i mod num_classes (n samples hold every class ⌊n/K⌋ or
    ⌈n/K⌉ times)."""
    _check_num_classes(num_classes)
    idx = torch.arange(indices) if isinstance(indices, int) else _as_indices(indices)
    return idx % num_classes
