"""ADM UNet (Dhariwal & Nichol's architecture as EDM's `DhariwalUNet` builds it), a velocity network `model(x, t)`.

The function is that of EDM's `DhariwalUNet` (NVlabs/edm, `training/networks.py`) for its options, with the names
mapped as `teachers.edm.adm_config` does (model_channels → nf, channel_mult → ch_mult, num_blocks →
num_res_blocks, channel_mult_emb → emb_mult, label_dim → num_classes):

- time: the noise label `time_scale·t` (999 by default, as SlimFlow feeds its ADM students; 1 for an EDM teacher,
  fed EDM's c_noise) → sinusoidal embedding [cos, sin] of nf channels with frequencies 10000^(-k/(nf/2)) (no
  endpoint) → Linear → SiLU → Linear; a class-conditional model adds `map_label(one_hot(label))` (a Linear
  without bias: NO_LABEL, the zero one-hot vector, adds nothing), then SiLU;
- blocks: residual blocks with GroupNorm (eps 1e-5, min(C // 4, 32) groups), the embedding as a per-channel
  scale and shift after the second norm (x·(1 + scale) + shift), no skip rescaling; up- and down-sampling by
  nearest ×2 and 2×2 averaging (EDM's [1, 1] filter) of both paths, a 1×1 skip convolution only where the channel
  count changes; multi-head attention (64 channels per head, heads = C // 64, so none below 64 channels) with a
  fused 1×1 qkv convolution laid out per head as EDM's (output channel 3·d·h + 3·c + j: head h, channel c, q/k/v j);
- layout: `enc` and `dec` dictionaries with EDM's keys ('64x64_conv', '64x64_block0', '32x32_down', '8x8_in0',
  '16x16_up', ...), `out_norm`, `out_conv`. Parameter names are EDM's below 'model.', so an EDM state dict loads by
  name once two kinds of tensor are left out: `resample_filter` buffers (the fixed [1, 1] filter: resampling is
  pooling here), `map_augment.weight` (augmentation labels, which sampling never gives) — see `teachers.edm`.

Initialisation is EDM's for ADM: PyTorch's default uniform for convolutions and linear layers, zero for the last
convolution of each block, the attention projection and the output convolution (an untrained model outputs 0),
N(0, 1) for the label embedding. Training-time label dropout is the training stage's (`flow.label_dropout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from teachers.unet import _group_norm, check_inputs, check_labels, network_config, one_hot_labels

ARCH = "adm"  # the `arch` key of an ADM config (a config without `arch` is a DDPM++ `teachers.unet.UNet`)
CHANNELS_PER_HEAD = 64  # EDM's DhariwalUNet attention: heads = channels // 64
GROUPNORM_EPS = 1e-5  # EDM's UNetBlock and GroupNorm default, which DhariwalUNet keeps (SongUNet sets 1e-6)
MAX_POSITIONS = 10000


def positional_embedding(noise: torch.Tensor, channels: int, endpoint: bool = False) -> torch.Tensor:
    """EDM's PositionalEmbedding: (B,) → (B, channels) = [cos(n·f_k), sin(n·f_k)], f_k = (1/10000)^(k/(half − e)),
    k < half = channels // 2, e = 1 with endpoint (DDPM++), 0 without (ADM)."""
    half = channels // 2
    exponents = torch.arange(half, dtype=noise.dtype, device=noise.device) / (half - int(endpoint))
    args = noise[:, None] * (1 / MAX_POSITIONS) ** exponents[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def attention_heads(channels: int) -> int:
    return channels // CHANNELS_PER_HEAD


def _zero(module: nn.Module) -> nn.Module:
    for tensor in module.parameters():
        nn.init.zeros_(tensor)
    return module


def _resample(x: torch.Tensor, up: bool, down: bool) -> torch.Tensor:
    """EDM's [1, 1]-filter resampling: nearest ×2 up (transposed box filter), 2×2 mean down."""
    if up:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if down:
        return F.avg_pool2d(x, 2)
    return x


class ADMBlock(nn.Module):
    """EDM's UNetBlock as DhariwalUNet configures it (adaptive scale, skip scale 1, eps 1e-5, 64 channels per head).

    `concat_skip`: a decoder block whose input is the previous output concatenated with an encoder skip.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        concat_skip: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_ch, out_ch
        self.up, self.down, self.concat_skip = up, down, concat_skip
        self.num_heads = attention_heads(out_ch) if attention else 0
        if self.num_heads and out_ch % self.num_heads:
            raise ValueError(
                f"attention over {out_ch} channels: {self.num_heads} heads (C // {CHANNELS_PER_HEAD}) do not divide "
                "them; choose nf and ch_mult so that attention levels have a multiple of their head count"
            )
        self.norm0 = _group_norm(in_ch, GROUPNORM_EPS)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * out_ch)  # per channel: scale, then shift
        self.norm1 = _group_norm(out_ch, GROUPNORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        # SiLU as modules (no parameters): hooks see every activation, as in teachers.unet
        self.act0, self.act1 = nn.SiLU(), nn.SiLU()
        if self.num_heads:
            self.norm2 = _group_norm(out_ch, GROUPNORM_EPS)
            self.qkv = nn.Conv2d(out_ch, 3 * out_ch, 1)
            self.proj = _zero(nn.Conv2d(out_ch, out_ch, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(_resample(self.act0(self.norm0(x)), self.up, self.down))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.act1(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        skip = _resample(x, self.up, self.down)
        x = h + (self.skip(skip) if self.skip is not None else skip)
        if self.num_heads:
            x = x + self.proj(self.attend(self.norm2(x)))
        return x

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention per head over all positions, scaled by 1/√d (d = C / heads)."""
        b, c, height, width = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, heads, c // heads, 3, height * width)
        q, k, v = (qkv[:, :, :, j].transpose(2, 3) for j in range(3))  # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(2, 3).reshape(b, c, height, width)


class ADM(nn.Module):
    """ADM velocity network `model(x, t[, labels])`; see the module docstring. State-dict names are EDM's."""

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
        emb_mult: int = 4,
    ) -> None:
        super().__init__()
        config = network_config(
            in_channels, resolution, nf, ch_mult, num_res_blocks, attn_resolutions, dropout, time_scale, num_classes
        )
        if isinstance(emb_mult, bool) or int(emb_mult) != emb_mult or emb_mult < 1:
            raise ValueError(f"emb_mult (EDM's channel_mult_emb) must be an int >= 1, got {emb_mult!r}")
        self.config: dict[str, Any] = {"arch": ARCH, **config, "emb_mult": int(emb_mult)}
        ch_mult, attn_resolutions = config["ch_mult"], config["attn_resolutions"]
        self.num_classes = config.get("num_classes", 0)
        self.in_channels, self.resolution, self.nf = int(in_channels), int(resolution), int(nf)
        self.time_scale = float(time_scale)
        self.sample_shape = (self.in_channels, self.resolution, self.resolution)
        emb_dim = nf * int(emb_mult)

        self.map_layer0 = nn.Linear(nf, emb_dim)
        self.map_layer1 = nn.Linear(emb_dim, emb_dim)
        self.map_label = nn.Linear(self.num_classes, emb_dim, bias=False) if self.num_classes else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight)  # EDM: kaiming_normal (std 1/√K) times √K
        self.map_act0, self.emb_act = nn.SiLU(), nn.SiLU()
        self.enc, self.dec = self._encoder_decoder(ch_mult, num_res_blocks, attn_resolutions, emb_dim, dropout)
        channels = nf * ch_mult[0]
        self.out_norm = _group_norm(channels, GROUPNORM_EPS)
        self.out_act = nn.SiLU()
        self.out_conv = _zero(nn.Conv2d(channels, self.in_channels, 3, padding=1))

    def _encoder_decoder(
        self, ch_mult: list[int], blocks: int, attn_resolutions: list[int], emb_dim: int, dropout: float
    ) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        """EDM's enc/dec dictionaries: per level (fine to coarse) the input conv or a down block, then `blocks`
        blocks; per level (coarse to fine) two middle blocks (the first with attention) or an up block, then
        `blocks` + 1 blocks taking an encoder skip each."""
        nf, kwargs = self.nf, {"emb_dim": emb_dim, "dropout": dropout}
        enc, dec = nn.ModuleDict(), nn.ModuleDict()
        out = nf * ch_mult[0]
        skips = []
        for level, mult in enumerate(ch_mult):
            res = self.resolution >> level
            if level == 0:
                enc[f"{res}x{res}_conv"] = nn.Conv2d(self.in_channels, out, 3, padding=1)
            else:
                enc[f"{res}x{res}_down"] = ADMBlock(out, out, down=True, **kwargs)
            skips.append(out)
            for idx in range(blocks):
                enc[f"{res}x{res}_block{idx}"] = ADMBlock(out, nf * mult, attention=res in attn_resolutions, **kwargs)
                out = nf * mult
                skips.append(out)
        for level in reversed(range(len(ch_mult))):
            res = self.resolution >> level
            if level == len(ch_mult) - 1:
                dec[f"{res}x{res}_in0"] = ADMBlock(out, out, attention=True, **kwargs)
                dec[f"{res}x{res}_in1"] = ADMBlock(out, out, **kwargs)
            else:
                dec[f"{res}x{res}_up"] = ADMBlock(out, out, up=True, **kwargs)
            for idx in range(blocks + 1):
                attention = res in attn_resolutions
                block = ADMBlock(
                    out + skips.pop(), nf * ch_mult[level], attention=attention, concat_skip=True, **kwargs
                )
                dec[f"{res}x{res}_block{idx}"] = block
                out = nf * ch_mult[level]
        return enc, dec

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, labels: torch.Tensor | Sequence[int] | int | None = None
    ) -> torch.Tensor:
        """Velocity at (x, t[, labels]) with the conventions of `teachers.unet.UNet.forward`."""
        t = check_inputs(x, t, self.in_channels, self.resolution, "ADM")
        emb_dtype = torch.promote_types(x.dtype, torch.float32)
        emb = positional_embedding(t.to(emb_dtype) * self.time_scale, self.nf)
        emb = self.map_layer1(self.map_act0(self.map_layer0(emb.to(self.map_layer0.weight.dtype))))
        if self.map_label is not None or labels is not None:
            emb = emb + self.label_embedding(check_labels(labels, self.num_classes, x.shape[0], x.device))
        emb = self.emb_act(emb)

        skips = []
        h = x
        for block in self.enc.values():
            h = block(h, emb) if isinstance(block, ADMBlock) else block(h)
            skips.append(h)
        for block in self.dec.values():
            if block.concat_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.out_conv(self.out_act(self.out_norm(h)))

    def label_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """map_label(one_hot(labels)) (B, emb_dim); NO_LABEL rows are zero (the Linear has no bias)."""
        return self.map_label(one_hot_labels(labels, self.num_classes, self.map_label.weight.dtype))


_REQUIRED_KEYS = ("arch", "in_channels", "resolution", "nf", "ch_mult", "num_res_blocks", "attn_resolutions")
_OPTIONAL_KEYS = ("dropout", "time_scale", "num_classes", "emb_mult")


def build_adm(config: dict[str, Any]) -> ADM:
    """Build an ADM from its `config` dict (as in `model.config` or an `ADM_PRESETS` entry)."""
    unknown = sorted(set(config) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if unknown or missing:
        raise ValueError(
            f"bad ADM config: unknown keys {unknown}, missing keys {missing}; "
            f"required {list(_REQUIRED_KEYS)}, optional {list(_OPTIONAL_KEYS)}"
        )
    if config["arch"] != ARCH:
        raise ValueError(f"an ADM config has arch {ARCH!r}, got {config['arch']!r}")
    return ADM(**{k: v for k, v in config.items() if k != "arch"})


def _imagenet64(nf: int, ch_mult: tuple[int, ...], blocks: int, attn: list[int], dropout: float) -> dict[str, Any]:
    return {
        "arch": ARCH,
        "in_channels": 3,
        "resolution": 64,
        "nf": nf,
        "ch_mult": list(ch_mult),
        "num_res_blocks": blocks,
        "attn_resolutions": attn,
        "dropout": dropout,
        "num_classes": 1000,
    }


# Class-conditional ImageNet-64 ADMs (parameter counts in tests/test_adm.py):
# - adm-295.9m: EDM's edm-imagenet-64x64-cond-adm (train.py --arch=adm --cond=1 --dropout=0.10: DhariwalUNet's
#   defaults model_channels 192, channel_mult [1, 2, 3, 4], 3 blocks, attention at 32, 16, 8);
# - adm-80.7m / adm-44.7m: SlimFlow's ImageNet-64 students (its README's DhariwalUNet settings, dropout 0.13 as its
#   create_model_edm).
ADM_PRESETS: dict[str, dict[str, Any]] = {
    "adm-295.9m": _imagenet64(192, (1, 2, 3, 4), 3, [32, 16, 8], 0.10),
    "adm-80.7m": _imagenet64(128, (1, 2, 2, 4), 2, [32, 16], 0.13),
    "adm-44.7m": _imagenet64(128, (1, 2, 2, 2), 2, [32, 16], 0.13),
}
