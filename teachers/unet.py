"""DDPM++ / NCSN++ UNet (score_sde, RectifiedFlow and SlimFlow reference layout).

The module tree reproduces the reference `NCSNpp` model in its DDPM++ configuration (positional time
embedding, BigGAN residual blocks with skip rescaling, DDPM attention, no FIR, no progressive paths), so its
state dict has the reference keys `all_modules.<i>.<...>` in the same order and with the same shapes and a
reference checkpoint loads into it (see `teachers.reference`).

`model(x, t)` takes t in [0, 1] (t = 0 noise, t = 1 data) and feeds `time_scale * t` (999 by default, as the
RectifiedFlow reference calls its network on 999·t) to the sinusoidal embedding.

Class-conditional models (`num_classes` K > 0 in the config) are called `model(x, t, labels)` with int labels in
[0, K) or `NO_LABEL` (-1, "no label": the unconditional branch of classifier-free guidance). As in EDM's SongUNet,
the label enters as `map_label(one_hot(label)·√K)`, a Linear K → nf added to the sinusoidal time embedding before
the embedding MLP; "no label" is the zero one-hot vector. An unconditional model (K = 0, the default) has no
`map_label` and its config no `num_classes` key: its state dict, config and outputs are those of before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Reference init_scale = 0 is replaced by this tiny variance, as in the reference default_init.
_ZERO_INIT_SCALE = 1e-10


@torch.no_grad()
def variance_scaling_uniform_(tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Fill a (out, in, *kernel) tensor from U(-b, b), b = sqrt(3·scale / fan_avg) (DDPM `default_init`).

    fan_avg = (in + out)·prod(kernel) / 2; scale 0 means 1e-10, as in the reference.
    """
    scale = _ZERO_INIT_SCALE if scale == 0 else scale
    fan_avg = (tensor.shape[0] + tensor.shape[1]) * math.prod(tensor.shape[2:]) / 2.0
    bound = math.sqrt(3.0 * scale / fan_avg)
    return tensor.uniform_(-bound, bound)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) → (B, dim): [sin(t·f_k), cos(t·f_k)], f_k = max_period^(-k/(dim/2 − 1))."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=timesteps.dtype, device=timesteps.device) * (-math.log(max_period) / (half - 1))
    )
    args = timesteps[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with min(C // 4, 32) groups (score_sde and EDM); eps 1e-6 as DDPM++ (EDM's ADM uses 1e-5)."""
    groups = min(channels // 4, 32)
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"GroupNorm with min(C // 4, 32) = {groups} groups cannot normalise C = {channels} channels; "
            "choose nf and ch_mult so that every channel count (also the skip concatenations) is a multiple "
            "of 4 below 128 and of 32 from 128 on"
        )
    return nn.GroupNorm(groups, channels, eps=eps)


def _conv(in_ch: int, out_ch: int, kernel_size: int, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
    variance_scaling_uniform_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _dense(in_features: int, out_features: int) -> nn.Linear:
    dense = nn.Linear(in_features, out_features)
    variance_scaling_uniform_(dense.weight)
    nn.init.zeros_(dense.bias)
    return dense


class NIN(nn.Module):
    """Per-position linear map `x @ W + b` on tokens (..., C_in) → (..., C_out); W is (C_in, C_out) (reference)."""

    def __init__(self, in_ch: int, out_ch: int, init_scale: float = 0.1) -> None:
        super().__init__()
        self.W = nn.Parameter(variance_scaling_uniform_(torch.empty(in_ch, out_ch), init_scale))
        self.b = nn.Parameter(torch.zeros(out_ch))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens @ self.W + self.b


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, residual with 1/sqrt(2) rescale (reference AttnBlockpp)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.GroupNorm_0(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        attended = F.scaled_dot_product_attention(self.NIN_0(tokens), self.NIN_1(tokens), self.NIN_2(tokens))
        out = self.NIN_3(attended).transpose(1, 2).reshape(b, c, h, w)
        return (x + out) / math.sqrt(2.0)


class ResBlock(nn.Module):
    """BigGAN residual block (reference ResnetBlockBigGANpp, fir=False, skip_rescale=True, init_scale=0).

    Optional nearest ×2 up- or 2×2 average down-sampling of both paths; the time embedding (already passed
    through swish) adds a per-channel bias after the first convolution.
    """

    def __init__(
        self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, up: bool = False, down: bool = False
    ) -> None:
        super().__init__()
        self.up = up
        self.down = down
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        self.Dense_0 = _dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale=0.0)
        self.Conv_2 = _conv(in_ch, out_ch, 1) if (in_ch != out_ch or up or down) else None
        # swish as modules (no parameters, so the state dict is unchanged): hooks see every activation (DNR)
        self.act_0, self.act_1 = nn.SiLU(), nn.SiLU()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        h = self._resample(self.act_0(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h) + self.Dense_0(temb_act)[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act_1(self.GroupNorm_1(h))))
        if self.Conv_2 is not None:
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0)


class UNet(nn.Module):
    """DDPM++ UNet velocity network `model(x, t)`; parameters and state-dict keys match the reference NCSNpp."""

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        nf: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        time_scale: float = 999.0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = network_config(
            in_channels, resolution, nf, ch_mult, num_res_blocks, attn_resolutions, dropout, time_scale, num_classes
        )
        ch_mult, attn_resolutions = self.config["ch_mult"], self.config["attn_resolutions"]
        self.num_classes = self.config.get("num_classes", 0)
        self.in_channels = in_channels
        self.resolution = resolution
        self.nf = nf
        self.num_res_blocks = num_res_blocks
        self.time_scale = float(time_scale)
        self.num_levels = len(ch_mult)
        self.attn_at_level = [resolution // 2**level in attn_resolutions for level in range(self.num_levels)]

        temb_dim = 4 * nf
        self.temb_act_0, self.temb_act_1, self.out_act = nn.SiLU(), nn.SiLU(), nn.SiLU()  # see ResBlock.act_0
        block_kwargs = {"temb_dim": temb_dim, "dropout": dropout}
        modules: list[nn.Module] = [_dense(nf, temb_dim), _dense(temb_dim, temb_dim), _conv(in_channels, nf, 3)]
        skip_channels = [nf]
        ch = nf
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                modules.append(ResBlock(ch, nf * mult, **block_kwargs))
                ch = nf * mult
                if self.attn_at_level[level]:
                    modules.append(AttnBlock(ch))
                skip_channels.append(ch)
            if level != self.num_levels - 1:
                modules.append(ResBlock(ch, ch, down=True, **block_kwargs))
                skip_channels.append(ch)

        modules += [ResBlock(ch, ch, **block_kwargs), AttnBlock(ch), ResBlock(ch, ch, **block_kwargs)]

        for level in reversed(range(self.num_levels)):
            for _ in range(num_res_blocks + 1):
                modules.append(ResBlock(ch + skip_channels.pop(), nf * ch_mult[level], **block_kwargs))
                ch = nf * ch_mult[level]
            if self.attn_at_level[level]:
                modules.append(AttnBlock(ch))
            if level != 0:
                modules.append(ResBlock(ch, ch, up=True, **block_kwargs))

        modules += [_group_norm(ch), _conv(ch, in_channels, 3, init_scale=0.0)]
        self.all_modules = nn.ModuleList(modules)
        # EDM SongUNet's map_label (xavier-uniform weight, zero bias); only in conditional models
        self.map_label = _dense(self.num_classes, nf) if self.num_classes else None

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, labels: torch.Tensor | Sequence[int] | int | None = None
    ) -> torch.Tensor:
        """Velocity at (x, t[, labels]): x (B, C, H, W), t in [0, 1] of shape (B,) or a scalar, labels (B,) ints in
        [0, num_classes) or NO_LABEL (conditional models only, where they are required); returns x's shape."""
        t = self._check_inputs(x, t)
        blocks: Iterator[nn.Module] = iter(self.all_modules)
        emb_dtype = torch.promote_types(x.dtype, torch.float32)
        emb = timestep_embedding(t.to(emb_dtype) * self.time_scale, self.nf)
        if self.map_label is not None or labels is not None:
            emb = emb + self.label_embedding(check_labels(labels, self.num_classes, x.shape[0], x.device), emb.dtype)
        dense_0, dense_1 = next(blocks), next(blocks)
        temb_act = self.temb_act_1(dense_1(self.temb_act_0(dense_0(emb.to(dense_0.weight.dtype)))))

        skips = [next(blocks)(x)]
        for level in range(self.num_levels):
            for _ in range(self.num_res_blocks):
                h = next(blocks)(skips[-1], temb_act)
                if self.attn_at_level[level]:
                    h = next(blocks)(h)
                skips.append(h)
            if level != self.num_levels - 1:
                skips.append(next(blocks)(skips[-1], temb_act))

        h = next(blocks)(skips[-1], temb_act)
        h = next(blocks)(h)
        h = next(blocks)(h, temb_act)

        for level in reversed(range(self.num_levels)):
            for _ in range(self.num_res_blocks + 1):
                h = next(blocks)(torch.cat([h, skips.pop()], dim=1), temb_act)
            if self.attn_at_level[level]:
                h = next(blocks)(h)
            if level != 0:
                h = next(blocks)(h, temb_act)

        h = self.out_act(next(blocks)(h))
        return next(blocks)(h)

    def label_embedding(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """map_label(one_hot(labels)·√K) (B, nf); NO_LABEL rows are the zero vector's embedding (the bias)."""
        one_hot = one_hot_labels(labels, self.num_classes, self.map_label.weight.dtype)
        return self.map_label(one_hot * math.sqrt(self.num_classes)).to(dtype)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return check_inputs(x, t, self.in_channels, self.resolution)


def check_inputs(
    x: torch.Tensor, t: torch.Tensor | float, in_channels: int, resolution: int, network: str = "UNet"
) -> torch.Tensor:
    """t as a (B,) float tensor (a scalar is broadcast) after checking x's shape (B, C, H, W) and t's dtype and shape."""
    expected = (in_channels, resolution, resolution)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{network} expects x of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
            f"(in_channels={in_channels}, resolution={resolution}), got {tuple(x.shape)}"
        )
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        raise ValueError(f"{network} expects a float time t in [0, 1], got dtype {t.dtype}")
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{network} expects t of shape ({x.shape[0]},) or a scalar, got {tuple(t.shape)}")
    return t


NO_LABEL = -1  # the "no label" class of a conditional model (classifier-free guidance's unconditional branch)


def one_hot_labels(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) one-hot rows of checked labels (see `check_labels`); a NO_LABEL row is all zero (EDM's dropped label)."""
    classes = torch.arange(num_classes, device=labels.device)
    return (labels[:, None] == classes[None, :]).to(dtype)


def check_labels(labels: Any, num_classes: int, batch: int, device: torch.device | None = None) -> torch.Tensor:
    """`labels` as an int64 tensor of shape (batch,) (an int is broadcast), or a ValueError saying what is wrong:
    labels for an unconditional model (num_classes 0), none for a conditional one, non-integers, a wrong shape, or
    a label outside [0, num_classes) other than NO_LABEL."""
    if not num_classes:
        if labels is not None:
            raise ValueError(
                "labels were given to an unconditional model (its config has no num_classes); call it as model(x, t)"
            )
        return None
    if labels is None:
        raise ValueError(
            f"this model is class-conditional ({num_classes} classes): call it as model(x, t, labels), labels in "
            f"[0, {num_classes}) or NO_LABEL = {NO_LABEL} for no label"
        )
    labels = torch.as_tensor(labels, device=device)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers (class indices), got dtype {labels.dtype}")
    labels = labels.to(torch.long)
    if labels.ndim == 0:
        labels = labels.expand(batch)
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) (one per sample) or be one int, got {tuple(labels.shape)}")
    if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
        bad = (labels >= num_classes) | (labels < NO_LABEL)
        if bad.any():
            raise ValueError(
                f"label {int(labels[bad][0])} is outside [0, {num_classes}) (the model has {num_classes} classes; "
                f"NO_LABEL = {NO_LABEL} means no label)"
            )
    return labels


def network_config(
    in_channels: int,
    resolution: int,
    nf: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Sequence[int],
    dropout: float,
    time_scale: float,
    num_classes: int,
) -> dict[str, Any]:
    """The checked config of a network of this family (the UNet's; the ADM adds its own keys): plain ints and
    floats, and `num_classes` only for a class-conditional model, so an unconditional config is exactly that of
    before conditioning existed."""
    ch_mult = [int(m) for m in ch_mult]
    attn_resolutions = [int(r) for r in attn_resolutions]
    _check_arguments(in_channels, resolution, nf, ch_mult, num_res_blocks, attn_resolutions, dropout)
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: unconditional), got {num_classes!r}")
    config: dict[str, Any] = {
        "in_channels": int(in_channels),
        "resolution": int(resolution),
        "nf": int(nf),
        "ch_mult": ch_mult,
        "num_res_blocks": int(num_res_blocks),
        "attn_resolutions": attn_resolutions,
        "dropout": float(dropout),
        "time_scale": float(time_scale),
    }
    return {**config, "num_classes": int(num_classes)} if num_classes else config


def _check_arguments(
    in_channels: int,
    resolution: int,
    nf: int,
    ch_mult: list[int],
    num_res_blocks: int,
    attn_resolutions: list[int],
    dropout: float,
) -> None:
    if in_channels < 1 or num_res_blocks < 1 or not ch_mult or min(ch_mult) < 1:
        raise ValueError(
            f"UNet needs in_channels >= 1, num_res_blocks >= 1 and a non-empty ch_mult of positive ints; "
            f"got in_channels={in_channels}, num_res_blocks={num_res_blocks}, ch_mult={ch_mult}"
        )
    if nf < 4 or nf % 2:
        raise ValueError(f"UNet needs an even nf >= 4 (sinusoidal time embedding of size nf), got nf={nf}")
    factor = 2 ** (len(ch_mult) - 1)
    if resolution < factor or resolution % factor:
        raise ValueError(
            f"resolution {resolution} must be divisible by 2**(len(ch_mult) - 1) = {factor} "
            f"(ch_mult={ch_mult} downsamples {len(ch_mult) - 1} times)"
        )
    resolutions = [resolution // 2**level for level in range(len(ch_mult))]
    unused = [r for r in attn_resolutions if r not in resolutions]
    if unused:
        raise ValueError(
            f"attn_resolutions {unused} are not among the UNet's feature resolutions {resolutions} "
            f"(resolution={resolution}, ch_mult={ch_mult})"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


_REQUIRED_KEYS = UNET_KEYS = ("in_channels", "resolution", "nf", "ch_mult", "num_res_blocks", "attn_resolutions")
_OPTIONAL_KEYS = ("dropout", "time_scale", "num_classes")


def build_unet(config: dict[str, Any]) -> UNet:
    """Build a UNet from its `config` dict (as in `model.config` or a `PRESETS` entry)."""
    unknown = sorted(set(config) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if unknown or missing:
        raise ValueError(
            f"bad UNet config: unknown keys {unknown}, missing keys {missing}; "
            f"required {list(_REQUIRED_KEYS)}, optional {list(_OPTIONAL_KEYS)}"
        )
    return UNet(**config)


def _ddpmpp(nf: int, ch_mult: tuple[int, ...], num_res_blocks: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "resolution": 32,
        "nf": nf,
        "ch_mult": list(ch_mult),
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": [16],
        "dropout": 0.15,
    }


def _fmnist(nf: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn: list[int], dropout: float) -> dict[str, Any]:
    return {
        "in_channels": 1,
        "resolution": 32,
        "nf": nf,
        "ch_mult": list(ch_mult),
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": attn,
        "dropout": dropout,
    }


# Paper architectures (SlimFlow's DDPM++ sizes, CIFAR-10 32×32) and the CPU-scale Fashion-MNIST family (32×32, 1 channel).
PRESETS: dict[str, dict[str, Any]] = {
    "ddpmpp-61.8m": _ddpmpp(128, (1, 2, 2, 2), 4),
    "ddpmpp-27.9m": _ddpmpp(128, (1, 2, 2), 2),
    "ddpmpp-15.7m": _ddpmpp(96, (1, 2, 2), 2),
    "ddpmpp-7.0m": _ddpmpp(64, (1, 2, 2), 2),
    "ddpmpp-3.4m": _ddpmpp(64, (1, 1, 2), 1),
    "fmnist-teacher": _fmnist(24, (1, 2, 2, 2), 2, [8], 0.0),  # teachers/weights/fmnist_teacher.safetensors
    "fmnist-student-s": _fmnist(12, (1, 2, 2), 1, [16], 0.0),
    "fmnist-student-m": _fmnist(16, (1, 2, 2), 1, [16], 0.0),
    "fmnist-student-l": _fmnist(20, (1, 2, 2), 1, [16], 0.0),
}
