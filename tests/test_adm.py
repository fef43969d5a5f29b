"""The ADM network (teachers/adm.py): EDM's DhariwalUNet rebuilt, loaded from EDM pickles, and its presets.

The EDM-format networks are written here: a small DhariwalUNet with EDM's module and parameter names and its forward
computation (written for this test: scale-shift blocks, 64 channels per head with a fused qkv laid out per head,
resample-only skips, the label added after the embedding MLP), pickled with `tests/test_edm_pickle.py`'s writer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import test_edm_pickle as edm_format  # EDM's persistence format and layers, written for the SongUNet tests
import torch
import torch.nn.functional as F
from test_edm_pickle import edm_names  # noqa: F401  (the fixture naming torch_utils.persistence for the pickler)
from torch import nn

from slimflow.checkpoint import CheckpointError, save_model
from slimflow.cli import main
from teachers.adapters import TeacherVelocity
from teachers.adm import ADM, ADM_PRESETS, ADMBlock, build_adm, positional_embedding
from teachers.inspect import describe_checkpoint
from teachers.unet import NO_LABEL
from teachers.zoo import build_model, load_model

persistent, Linear, GroupNorm = edm_format.persistent, edm_format.Linear, edm_format.GroupNorm


# ---------------------------------------------------------------- EDM's DhariwalUNet, written for this test
@persistent
class Conv2d(nn.Module):
    """EDM's Conv2d with the [1, 1] filter: optional ×2 resampling (depthwise), then the kernel; kernel 0 is
    resampling only (no weight, no bias), as DhariwalUNet's skip of an up/down block."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        self.fused_resample = False
        fan_in = in_channels * kernel * kernel
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel) / math.sqrt(fan_in or 1))
        self.bias = nn.Parameter(0.1 * torch.randn(out_channels)) if bias else None
        if not kernel:
            self.weight = self.bias = None
        self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25) if up or down else None)

    def forward(self, x):
        channels = x.shape[1]
        if self.up:
            x = F.conv_transpose2d(x, (4 * self.resample_filter).repeat(channels, 1, 1, 1), groups=channels, stride=2)
        if self.down:
            x = F.conv2d(x, self.resample_filter.repeat(channels, 1, 1, 1), groups=channels, stride=2)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)
        return x


@persistent
class UNetBlock(nn.Module):
    """DhariwalUNet's block: scale-shift of the embedding, skip scale 1, eps 1e-5, heads = out_channels // 64."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = out_channels // 64 if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = 0.1, 1, True
        self.norm0 = GroupNorm(in_channels, eps=1e-5)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down)
        self.affine = Linear(emb_channels, 2 * out_channels)
        self.norm1 = GroupNorm(out_channels, eps=1e-5)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1 if in_channels != out_channels else 0, up=up, down=down)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=1e-5)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        x = F.silu(shift + self.norm1(x) * (scale + 1))
        x = self.conv1(F.dropout(x, self.dropout, self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
            attended = torch.einsum("nqk,nck->ncq", weights, v).reshape(b, c, h, w)
            x = (self.proj(attended) + x) * self.skip_scale
        return x


@persistent
class DhariwalUNet(nn.Module):
    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels,
        label_dim=0,
        augment_dim=0,
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        channel_mult_emb=4,
        num_blocks=3,
        attn_resolutions=(32, 16, 8),
        dropout=0.1,
        label_dropout=0,
    ):
        super().__init__()
        emb = model_channels * channel_mult_emb
        self.label_dropout = label_dropout
        self.map_noise = edm_format.PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb)
        self.map_layer1 = Linear(emb, emb)
        self.map_label = Linear(label_dim, emb, bias=False) if label_dim else None
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout, self.enc[f"{res}x{res}_conv"] = model_channels * mult, Conv2d(cout, model_channels * mult, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, emb, down=True)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb, attention=res in attn_resolutions)
        skips = [block.out_channels for block in self.enc.values()]
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, emb, attention=True)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, emb)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, emb, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb, attention=res in attn_resolutions)
        self.out_norm = GroupNorm(cout, eps=1e-5)
        self.out_conv = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)  # [cos, sin], no endpoint
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:  # one-hot labels (all zero: no label), after the MLP, no √K factor
            emb = emb + self.map_label(class_labels)
        emb = F.silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class Precond(nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = (
            img_resolution,
            img_channels,
            label_dim,
            use_fp16,
        )
        self.model = DhariwalUNet(img_resolution, img_channels, img_channels, label_dim=label_dim, **model_kwargs)


@persistent
class EDMPrecond(Precond):  # EDM's ImageNet-64 ADM teacher is an EDMPrecond
    def __init__(self, *args, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    forward = edm_format.EDMPrecond.forward


@persistent
class VPPrecond(Precond):
    def __init__(self, *args, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min, self.sigma_max = float(self.sigma(epsilon_t)), float(self.sigma(1))

    sigma, forward = edm_format.VPPrecond.sigma, edm_format.VPPrecond.forward


# 32, 64, 128 channels at 16², 8², 4²: no heads, one head, two heads (attention is asked for at every level)
TINY = {
    "model_channels": 32,
    "channel_mult": [1, 2, 4],
    "num_blocks": 1,
    "attn_resolutions": [16, 8, 4],
    "dropout": 0.1,
    "augment_dim": 9,
}
SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 12.0, 80.0], dtype=torch.float64)


def make_network(wrapper=EDMPrecond, seed=0, **options):
    torch.manual_seed(seed)
    return wrapper(16, 3, **{**TINY, **options}).eval().requires_grad_(False).double()


def one_hot(labels, classes):
    return F.one_hot(labels.clamp(min=0), classes).double() * (labels >= 0).double()[:, None]


def denoised(teacher, wrapper, x, sigma, labels=None):
    """EDM's D(x; σ) from the rebuilt wrapper (VP predicts ε: D = x − σ·ε̂)."""
    out = teacher.network(x, sigma, *(() if labels is None else (labels,)))
    return out if wrapper is EDMPrecond else x - sigma.view(-1, 1, 1, 1) * out


# ----------------------------------------------------------------------------- (a) the pickle loads, equal
@pytest.mark.parametrize("wrapper", [EDMPrecond, VPPrecond], ids=["edm", "vp"])
def test_adm_pickle_loads_and_equals_the_pickled_network(tmp_path, edm_names, wrapper):  # noqa: F811
    network = make_network(wrapper)
    teacher = load_model(edm_format.write_edm_pickle(tmp_path / "adm.pkl", edm_names, network))
    assert isinstance(teacher, TeacherVelocity) and teacher.sample_shape == (3, 16, 16)
    adm = teacher.network.network
    assert isinstance(adm, ADM) and adm.config["time_scale"] == 1.0 and adm.config["arch"] == "adm"
    heads = {name: block.num_heads for name, block in adm.named_modules() if isinstance(block, ADMBlock)}
    assert heads["enc.16x16_block0"] == 0 and heads["enc.8x8_block0"] == 1 and heads["dec.4x4_in0"] == 2
    torch.manual_seed(1)
    x = torch.randn(len(SIGMAS), 3, 16, 16, dtype=torch.float64) * (1 + SIGMAS.view(-1, 1, 1, 1))
    teacher = teacher.double()
    with torch.no_grad():
        expected = network(x, SIGMAS)
        torch.testing.assert_close(
            denoised(teacher, wrapper, x, SIGMAS), expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item()
        )
        # the velocity at project time t = 1/(1 + σ): (D(y·(1 + σ); σ) − y) / (1 − t)
        y, t = torch.randn_like(x), 1 / (1 + SIGMAS)
        reference = (network(y * (1 + SIGMAS).view(-1, 1, 1, 1), SIGMAS) - y) / (1 - t).view(-1, 1, 1, 1)
        torch.testing.assert_close(teacher(y, t), reference, rtol=1e-8, atol=1e-8)
    assert not edm_format.HOOK_CALLS


def test_an_adm_model_file_rebuilds_from_its_sidecar(tmp_path):
    """A project ADM model file (config with arch 'adm') loads through teachers.zoo like a UNet's."""
    small = {"resolution": 16, "nf": 32, "ch_mult": [1, 2], "attn_resolutions": [8], "num_classes": 3}
    model = build_model({"preset": "adm-80.7m", **small})
    for tensor in model.parameters():  # away from the zero initialisation of the output layers
        tensor.data.normal_(0, 0.2)
    path = save_model(tmp_path / "adm.safetensors", model, {"model": model.config, "kind": "test-teacher"})
    loaded = load_model(path)
    assert isinstance(loaded, ADM) and loaded.config == model.config and loaded.sample_shape == (3, 16, 16)
    x, t, labels = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 2, NO_LABEL])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, labels), model.eval()(x, t, labels))
    with pytest.raises(ValueError, match="unknown model arch 'transformer'"):
        build_model({**model.config, "arch": "transformer"})


def test_an_adm_student_anneals_and_distills_on_conditional_pairs(tmp_path):
    """The stages build a student from an ADM preset like a UNet's (tiny: 8×8, one channel, 3 classes)."""
    from test_conditional import make_store, student_cfgs, teacher_file

    from slimflow.stages.anneal import anneal
    from slimflow.stages.distill import distill

    make_store(tmp_path, teacher_file(tmp_path))
    anneal_cfg, distill_cfg = student_cfgs(tmp_path, tmp_path / "pairs", steps=2)
    small = {"in_channels": 1, "resolution": 8, "nf": 16, "ch_mult": [1, 2], "num_res_blocks": 1}
    anneal_cfg["model"] = {"preset": "adm-80.7m", **small, "attn_resolutions": [], "dropout": 0.0, "num_classes": 3}
    student = load_model(anneal(anneal_cfg)["export"])
    assert isinstance(student, ADM) and student.num_classes == 3 and student.config["time_scale"] == 999.0
    distilled = load_model(distill(distill_cfg)["export"])
    assert isinstance(distilled, ADM) and distilled.config == student.config


# ------------------------------------------------------------------------- (b) the function, checked by hand
def test_positional_embedding_is_edms_without_endpoint():
    """4 channels: frequencies 10000^(-0/2), 10000^(-1/2) = 1, 1/100; [cos, sin] (DDPM++'s endpoint: 1, 1/10000)."""
    noise = torch.tensor([3.0, -0.5], dtype=torch.float64)
    rows = [[math.cos(n), math.cos(n / 100), math.sin(n), math.sin(n / 100)] for n in (3.0, -0.5)]
    expected = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(positional_embedding(noise, 4), expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(
        positional_embedding(noise, 4, endpoint=True)[0, 1], torch.tensor(math.cos(3e-4)).double()
    )


@pytest.mark.parametrize("channels", [64, 128], ids=["one-head", "two-heads"])
def test_attention_is_per_head_softmax_attention(channels):
    """EDM's fused qkv: output channel 3·d·h + 3·c + j is head h's channel c of q (j=0), k (1), v (2); each head
    attends with softmax(qᵀk/√d), d = 64."""
    torch.manual_seed(0)
    block = ADMBlock(channels, channels, emb_dim=8, dropout=0.0, attention=True).double()
    assert block.num_heads == channels // 64
    x = torch.randn(2, channels, 3, 3, dtype=torch.float64)
    qkv = F.conv2d(x, block.qkv.weight, block.qkv.bias).reshape(2, channels // 64, 64, 3, 9)
    heads = []
    for h in range(channels // 64):
        q, k, v = qkv[:, h, :, 0], qkv[:, h, :, 1], qkv[:, h, :, 2]  # (B, 64, positions)
        weights = torch.softmax(q.transpose(1, 2) @ k / 8.0, dim=2)  # (B, query, key)
        heads.append(v @ weights.transpose(1, 2))  # (B, 64, query)
    expected = torch.cat(heads, dim=1).reshape(2, channels, 3, 3)
    torch.testing.assert_close(block.attend(x), expected, rtol=1e-12, atol=1e-12)


def test_zero_initialised_layers_make_plain_residuals_and_a_zero_output():
    """As EDM initialises ADM: conv1, proj and out_conv start at zero, so a block is the identity (skip scale 1,
    not DDPM++'s 1/√2) and an untrained network outputs exactly 0."""
    torch.manual_seed(0)
    block = ADMBlock(64, 64, emb_dim=16, dropout=0.0, attention=True)
    x = torch.randn(2, 64, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 16)), x)
    model = build_adm({"arch": "adm", "in_channels": 3, "resolution": 8, "nf": 16, "ch_mult": [1, 2]} | NO_ATTN)
    assert torch.equal(model(torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.7])), torch.zeros(2, 3, 8, 8))


NO_ATTN = {"num_res_blocks": 1, "attn_resolutions": []}


def dhariwal_unet_parameters(resolution, channels, label_dim, nf, mult, blocks, attn, emb_mult=4):
    """DhariwalUNet's parameter count by formula (EDM's constructor, no augment_dim), independent of both codes."""
    emb = nf * emb_mult

    def block(cin, cout, attention=False):
        """norm0, conv0 3×3, affine (scale and shift), norm1, conv1 3×3; a 1×1 skip where the width changes (an
        up/down block keeps it: its skip only resamples); norm2, qkv, proj where cout // 64 heads attend."""
        count = 2 * cin + (9 * cin + 1) * cout + (emb + 1) * 2 * cout + 2 * cout + (9 * cout + 1) * cout
        count += (cin + 1) * cout if cin != cout else 0
        return count + (2 * cout + (cout + 1) * 3 * cout + (cout + 1) * cout if attention and cout >= 64 else 0)

    total = (nf + 1) * emb + (emb + 1) * emb + label_dim * emb  # map_layer0, map_layer1, map_label (no bias)
    out = nf * mult[0]
    total += (9 * channels + 1) * out  # the input convolution
    skips = [out]
    for level, m in enumerate(mult):
        if level:
            total += block(out, out)  # down
            skips.append(out)
        for _ in range(blocks):
            total += block(out, nf * m, (resolution >> level) in attn)
            out = nf * m
            skips.append(out)
    total += block(out, out, attention=True) + block(out, out)  # the two middle blocks
    for level in reversed(range(len(mult))):
        if level != len(mult) - 1:
            total += block(out, out)  # up
        for _ in range(blocks + 1):
            total += block(out + skips.pop(), nf * mult[level], (resolution >> level) in attn)
            out = nf * mult[level]
    return total + 2 * out + (9 * out + 1) * channels  # out_norm, out_conv


# EDM's ImageNet-64 ADM is quoted as "about 296M"; no exact published count was found, so the exact number is that of
# EDM's own code (NVlabs/edm training/networks.py: DhariwalUNet as train.py --arch=adm --cond=1 builds it, counted by
# running that source once outside the tests, 295,899,267, and reproduced here by the formula above). SlimFlow's README names its ImageNet-64 students
# "80.7M" and "44.7M" (yuanzhi-zhu/SlimFlow README, "Model Configurations"); the exact counts are again EDM's code's.
PUBLISHED = {"adm-295.9m": (295_899_267, 296), "adm-80.7m": (80_685_315, 80.7), "adm-44.7m": (44_685_827, 44.7)}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_adm_presets_have_the_published_parameter_counts(preset):
    config = ADM_PRESETS[preset]
    with torch.device("meta"):  # no memory for 296M parameters
        model = build_model({"preset": preset})
    exact, published = PUBLISHED[preset]
    count = sum(p.numel() for p in model.parameters())
    formula = dhariwal_unet_parameters(
        64, 3, 1000, config["nf"], config["ch_mult"], config["num_res_blocks"], config["attn_resolutions"]
    )
    assert count == formula == exact
    assert round(count / 1e6, 1 if published != 296 else 0) == published
    assert config["num_classes"] == 1000 and config["resolution"] == 64 and config["in_channels"] == 3


def test_edms_imagenet_preset_is_dhariwalunets_default_configuration():
    """EDM's train.py --arch=adm sets model_channels 192 and channel_mult [1, 2, 3, 4]; num_blocks 3 and attention
    at 32, 16, 8 are DhariwalUNet's defaults (teachers.edm.DHARIWALUNET_ARGUMENTS)."""
    from teachers.edm import DHARIWALUNET_ARGUMENTS as edm_defaults

    preset = ADM_PRESETS["adm-295.9m"]
    assert preset["nf"] == edm_defaults["model_channels"] == 192
    assert preset["ch_mult"] == edm_defaults["channel_mult"] == [1, 2, 3, 4]
    assert preset["num_res_blocks"] == edm_defaults["num_blocks"] == 3
    assert preset["attn_resolutions"] == edm_defaults["attn_resolutions"] == [32, 16, 8]


# ------------------------------------------------------------------------------------------- (c) labels
def test_class_labels_of_a_conditional_adm_pickle(tmp_path, edm_names):  # noqa: F811
    network = make_network(label_dim=5)
    teacher = load_model(edm_format.write_edm_pickle(tmp_path / "cond.pkl", edm_names, network)).double()
    assert teacher.num_classes == 5 and teacher.network.network.map_label.bias is None
    torch.manual_seed(1)
    sigma = SIGMAS[1:5]
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64) * (1 + sigma.view(-1, 1, 1, 1))
    labels = torch.tensor([0, 4, 2, NO_LABEL])
    with torch.no_grad():
        expected = network(x, sigma, one_hot(labels, 5))  # NO_LABEL: EDM's all-zero label vector
        out = denoised(teacher, EDMPrecond, x, sigma, labels)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())
        other = denoised(teacher, EDMPrecond, x, sigma, torch.tensor([1, 3, 0, 4]))
        assert ((other - out).flatten(1).abs().amax(1) > 1e-6).all()  # every sample's label matters
        y, t = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
        assert teacher(y, t, labels).shape == y.shape
    with pytest.raises(ValueError, match=r"label 5 is outside \[0, 5\)"):
        teacher(y, t, torch.tensor([5, 0, 0, 0]))
    with pytest.raises(ValueError, match="class-conditional"):
        teacher(y, t)
    with pytest.raises(ValueError, match="labels were given to an unconditional model"):
        build_adm({"arch": "adm", "in_channels": 3, "resolution": 8, "nf": 16, "ch_mult": [1, 2]} | NO_ATTN)(
            y[:, :, :8, :8], t, labels
        )


# ------------------------------------------------------------------------------- (d) what is refused
def test_unsupported_adm_options_are_refused_by_name(tmp_path, edm_names):  # noqa: F811
    network = make_network()
    network.model._init_kwargs["channels_per_head"] = 32  # not a DhariwalUNet argument
    path = edm_format.write_edm_pickle(tmp_path / "option.pkl", edm_names, network)
    with pytest.raises(CheckpointError, match=r"unknown DhariwalUNet argument\(s\) \['channels_per_head'\]"):
        load_model(path)
    assert "not loadable" in describe_checkpoint(path)["notes"][-1]

    network = make_network()
    network.model.dec["8x8_block1"].skip_scale = np.sqrt(0.5)  # DDPM++'s rescaling, not ADM's
    path = edm_format.write_edm_pickle(tmp_path / "skip.pkl", edm_names, network)
    with pytest.raises(CheckpointError, match=r"model\.dec\.8x8_block1\.skip_scale is 0\.7071.*not 1"):
        load_model(path)

    network = make_network()
    network.model.enc["8x8_down"].skip.resample_filter = torch.full((1, 1, 4, 4), 1 / 16)  # an FIR filter
    path = edm_format.write_edm_pickle(tmp_path / "filter.pkl", edm_names, network)
    with pytest.raises(CheckpointError, match=r"enc\.8x8_down\.skip\.resample_filter is not the \[1, 1\] box filter"):
        load_model(path)

    network = make_network()
    del network.model.dec["4x4_in0"].qkv._parameters["bias"]
    path = edm_format.write_edm_pickle(tmp_path / "missing.pkl", edm_names, network)
    with pytest.raises(CheckpointError, match=r"missing: dec\.4x4_in0\.qkv\.bias"):
        load_model(path)


# ------------------------------------------------------------------------------------------ teacher info
def test_teacher_info_reports_an_adm_pickle(tmp_path, edm_names, capsys):  # noqa: F811
    network = make_network(label_dim=5, label_dropout=0.1)
    path = edm_format.write_edm_pickle(tmp_path / "adm.pkl", edm_names, network)
    info = describe_checkpoint(path)
    arch = info["architecture"]
    assert arch["wrapper"] == "EDMPrecond" and arch["network"] == "DhariwalUNet" and arch["model_channels"] == 32
    assert arch["num_blocks"] == 1 and arch["channel_mult_emb"] == 4 and arch["label_dim"] == 5
    assert arch["rebuilt_config"]["arch"] == "adm" and arch["rebuilt_config"]["num_classes"] == 5
    assert info["params"] == sum(p.numel() for p in network.parameters())
    rebuilt = info["params"] - network.model.map_augment.weight.numel()
    notes = " ".join(info["notes"])
    assert f"rebuilt as teachers.adm.ADM ({rebuilt:,} params)" in notes and "label_dropout 0.1" in notes
    assert info["prediction"] == "x0 (denoiser D) via EDMPrecond"
    main(["teacher", "info", str(path)])
    printed = capsys.readouterr().out
    assert 'network: "DhariwalUNet"' in printed and f"parameters:      {info['params']:,}" in printed
