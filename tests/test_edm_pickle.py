"""EDM `.pkl` networks: read without running their code, rebuilt as the project's UNet with equal outputs.

The EDM-format files are made here: small networks with EDM's module and parameter names and its forward
computations (written for this test), pickled the way `torch_utils.persistence` pickles them (every persistent
object reduces to `torch_utils.persistence._reconstruct_persistent_obj(meta)`, meta carrying the module source,
class name and `__dict__`), inside a snapshot dict {'ema': wrapper, 'loss_fn': ..., 'dataset_kwargs': EasyDict}.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimflow.checkpoint import CheckpointError
from slimflow.cli import main
from slimflow.flow import gaussian_rf_velocity
from teachers.adapters import TeacherVelocity, edm
from teachers.edm import EdmPrecondNetwork
from teachers.edm_pickle import read_edm_pickle
from teachers.formats import detect_format
from teachers.inspect import describe_checkpoint
from teachers.zoo import load_model

HOOK_CALLS: list[dict] = []  # what the stand-in persistence hook was called with (it must never be)


# ------------------------------------------------------------------ EDM-like modules (forward as in EDM)
def persistent(cls):
    """Record the constructor's arguments as EDM's persistent classes do (`_init_args`, `_init_kwargs`)."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._init_args, self._init_kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)

    cls.__init__, cls.persistent = __init__, True
    return cls


@persistent
class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(0.1 * torch.randn(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@persistent
class Conv2d(nn.Module):
    """A convolution after an optional ×2 resampling with the [1, 1] filter (as depthwise convolutions)."""

    def __init__(self, in_channels, out_channels, kernel, up=False, down=False):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down, self.fused_resample = (
            in_channels,
            out_channels,
            up,
            down,
            False,
        )
        fan_in = in_channels * kernel * kernel
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel) / math.sqrt(fan_in or 1))
        self.bias = nn.Parameter(0.1 * torch.randn(out_channels))
        self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25) if up or down else None)

    def forward(self, x):
        channels = x.shape[1]
        if self.up:
            x = F.conv_transpose2d(x, (4 * self.resample_filter).repeat(channels, 1, 1, 1), groups=channels, stride=2)
        if self.down:
            x = F.conv2d(x, self.resample_filter.repeat(channels, 1, 1, 1), groups=channels, stride=2)
        return F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)


@persistent
class GroupNorm(nn.Module):
    def __init__(self, num_channels, eps=1e-6):
        super().__init__()
        self.num_groups, self.eps = min(32, num_channels // 4), eps
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(num_channels))
        self.bias = nn.Parameter(0.1 * torch.randn(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


@persistent
class UNetBlock(nn.Module):
    """DDPM++ block: BigGAN residual block with skip scale √½, then optional one-head attention with a fused qkv."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads, self.dropout, self.skip_scale, self.adaptive_scale = int(attention), 0.1, np.sqrt(0.5), False
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down)
        if attention:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None]))
        x = self.conv1(F.dropout(x, self.dropout, self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, c, 3, h * w).unbind(2)  # channel 3c + j
            weights = torch.einsum("bcq,bck->bqk", q, k / math.sqrt(c)).softmax(dim=2)
            attended = torch.einsum("bqk,bck->bcq", weights, v).reshape(b, c, h, w)
            x = (self.proj(attended) + x) * self.skip_scale
        return x


@persistent
class PositionalEmbedding(nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=x.dtype) / (half - int(self.endpoint)))
        x = x.ger(freqs)  # EDM computes freqs in float32 and casts them: the same in float32
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistent
class SongUNet(nn.Module):
    """EDM's SongUNet restricted to DDPM++ (standard encoder/decoder, positional embedding, [1, 1] filter)."""

    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels,
        label_dim=0,
        augment_dim=0,
        model_channels=128,
        channel_mult=(1, 2, 2, 2),
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=(16,),
        dropout=0.1,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=(1, 1),
    ):
        super().__init__()
        emb = model_channels * channel_mult_emb
        self.map_noise = PositionalEmbedding(model_channels * channel_mult_noise, endpoint=True)
        self.map_label = Linear(label_dim, model_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb)
        self.map_layer1 = Linear(emb, emb)
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout, self.enc[f"{res}x{res}_conv"] = model_channels, Conv2d(cout, model_channels, 3)
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
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, emb, attention=attention)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = GroupNorm(cout)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:  # EDM: one-hot labels (all zero: no label) scaled by sqrt(label_dim)
            emb = emb + self.map_label(class_labels * np.sqrt(self.map_label.in_features))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if "aux_norm" in name:
                x = block(x)
            elif "aux_conv" in name:
                x = block(F.silu(x))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return x


class Precond(nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = (
            img_resolution,
            img_channels,
            label_dim,
            use_fp16,
        )
        self.model = SongUNet(img_resolution, img_channels, img_channels, label_dim=label_dim, **model_kwargs)


@persistent
class VPPrecond(Precond):
    def __init__(self, *args, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min, self.sigma_max = float(self.sigma(epsilon_t)), float(self.sigma(1))

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def forward(self, x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1, 1, 1)
        t = ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d
        return x - s * self.model(x / (s**2 + 1).sqrt(), (self.M - 1) * t, class_labels)


@persistent
class VEPrecond(Precond):
    def __init__(self, *args, sigma_min=0.02, sigma_max=100, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def forward(self, x, sigma, class_labels=None):
        return x + sigma.reshape(-1, 1, 1, 1) * self.model(x, (0.5 * sigma).log(), class_labels)


@persistent
class EDMPrecond(Precond):
    def __init__(self, *args, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def forward(self, x, sigma, class_labels=None):
        s, d = sigma.reshape(-1, 1, 1, 1), self.sigma_data
        c_skip, c_out, c_in = d**2 / (s**2 + d**2), s * d / (s**2 + d**2).sqrt(), 1 / (d**2 + s**2).sqrt()
        return c_skip * x + c_out * self.model(c_in * x, sigma.log() / 4, class_labels)


@persistent
class EDMLoss:  # a persistent object that is not a module, as in EDM's snapshots
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data


SMALL = {
    "model_channels": 16,
    "channel_mult": [1, 2, 2],
    "num_blocks": 1,
    "attn_resolutions": [4],
    "dropout": 0.1,
    "augment_dim": 9,
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
}
WIDER = {**SMALL, "channel_mult": [2, 2], "num_blocks": 2, "attn_resolutions": [8], "augment_dim": 0}


# ------------------------------------------------------------------------- pickling in EDM's format
@pytest.fixture
def edm_names(monkeypatch):
    """Modules `torch_utils.persistence` and `dnnlib.util` with stand-ins, so the pickler can name them."""

    def _reconstruct_persistent_obj(meta):
        HOOK_CALLS.append(meta)
        raise AssertionError("the persistence hook of the pickle was called")

    class EasyDict(dict):
        pass

    persistence = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    EasyDict.__module__, EasyDict.__qualname__ = util.__name__, "EasyDict"
    util.EasyDict = EasyDict
    for name, module in (
        ("torch_utils", types.ModuleType("torch_utils")),
        ("torch_utils.persistence", persistence),
        ("dnnlib", types.ModuleType("dnnlib")),
        ("dnnlib.util", util),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    HOOK_CALLS.clear()
    return types.SimpleNamespace(hook=_reconstruct_persistent_obj, EasyDict=EasyDict)


def write_edm_pickle(path, names, network, module_src="# the source of training/networks.py", protocol=4):
    """`pickle.dump` of an EDM snapshot dict, persistent objects reduced as `torch_utils.persistence` does."""

    class EdmPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if getattr(type(obj), "persistent", False):
                meta = {
                    "type": "class",
                    "version": 6,
                    "module_src": module_src,
                    "class_name": type(obj).__name__,
                    "state": dict(obj.__dict__),
                }
                return names.hook, (meta,)
            return NotImplemented

    snapshot = {
        "ema": network,
        "loss_fn": EDMLoss(),
        "augment_pipe": None,
        "dataset_kwargs": names.EasyDict(path="cifar10-32x32.zip", resolution=32),
    }
    with open(path, "wb") as handle:
        EdmPickler(handle, protocol=protocol).dump(snapshot)  # EDM wrote protocol 4 (Python's default then)
    return path


def make_network(wrapper, seed=0, resolution=8, channels=3, **options):
    torch.manual_seed(seed)
    return wrapper(resolution, channels, **{**SMALL, **options}).eval().requires_grad_(False)


SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 12.0, 80.0])


@pytest.mark.parametrize(
    "wrapper, options, protocol",
    [(VPPrecond, SMALL, 4), (VEPrecond, SMALL, 2), (EDMPrecond, SMALL, 5), (EDMPrecond, WIDER, 4)],
    ids=["vp", "ve-protocol2", "edm-protocol5", "edm-wider"],
)
def test_loaded_network_equals_the_pickled_one(tmp_path, edm_names, wrapper, options, protocol):
    network = make_network(wrapper, **options)
    path = write_edm_pickle(tmp_path / "net.pkl", edm_names, network, protocol=protocol)
    assert detect_format(path) == "edm-pickle"
    teacher = load_model(path)
    assert isinstance(teacher, TeacherVelocity) and teacher.sample_shape == (3, 8, 8) and not HOOK_CALLS

    torch.manual_seed(1)
    x = torch.randn(len(SIGMAS), 3, 8, 8) * (1 + SIGMAS.view(-1, 1, 1, 1))  # x0 + σ·n, at EDM's scale
    y = torch.randn(len(SIGMAS), 3, 8, 8)  # a state in project time
    inside = slice(1, None) if wrapper is VEPrecond else slice(None)  # VE's range starts at its sigma_min 0.02
    # float64: the same function up to rounding; float32: rounding differs (the two embedding formulas' frequencies
    # differ in the last bit, and VP's noise labels reach 999), so the tolerance is relative to the output's size
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        source, rebuilt, xs, sigma = network.to(dtype), teacher.to(dtype), x.to(dtype), SIGMAS.to(dtype)
        with torch.no_grad():
            expected = source(xs, sigma)
            out = rebuilt.network(xs, sigma)
            denoised = out if wrapper is EDMPrecond else xs - sigma.view(-1, 1, 1, 1) * out  # ε̂ -> D = x − σ·ε̂
            torch.testing.assert_close(denoised, expected, rtol=rtol, atol=rtol * expected.abs().max().item())
            # the velocity at project time t = 1/(1 + σ): (D(y·(1 + σ); σ) − y) / (1 − t)
            s, yy = sigma[inside], y[inside].to(dtype)
            tt = 1 / (1 + s)
            reference = (source(yy * (1 + s).view(-1, 1, 1, 1), s) - yy) / (1 - tt).view(-1, 1, 1, 1)
            if dtype == torch.float64:
                torch.testing.assert_close(rebuilt(yy, tt), reference, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("wrapper", [VPPrecond, EDMPrecond], ids=["vp", "edm"])
def test_class_conditional_network_loads_and_equals_the_pickled_one(tmp_path, edm_names, wrapper):
    """EDM's conditional SongUNet (map_label on one-hot labels): its labels become the UNet's class indices, EDM's
    all-zero label vector the UNet's NO_LABEL."""
    from teachers.unet import NO_LABEL

    network = make_network(wrapper, label_dim=4)
    teacher = load_model(write_edm_pickle(tmp_path / "cond.pkl", edm_names, network))
    assert teacher.num_classes == 4 and teacher.network.network.map_label is not None
    torch.manual_seed(1)
    sigma = SIGMAS[:4].double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64) * (1 + sigma.view(-1, 1, 1, 1))
    labels = torch.tensor([0, 3, 1, NO_LABEL])
    one_hot = F.one_hot(labels.clamp(min=0), 4).double() * (labels >= 0).double()[:, None]
    source, rebuilt = network.double(), teacher.double()
    with torch.no_grad():
        expected = source(x, sigma, one_hot)
        out = rebuilt.network(x, sigma, labels)
        denoised = out if wrapper is EDMPrecond else x - sigma.view(-1, 1, 1, 1) * out
        torch.testing.assert_close(denoised, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())
        other = rebuilt.network(x, sigma, torch.tensor([1, 2, 3, 0]))
        assert (other - out).abs().max() > 1e-6  # the labels matter
        y, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
        assert rebuilt(y, t, labels).shape == y.shape
    with pytest.raises(ValueError, match="class-conditional"):
        rebuilt(y, t)
    with pytest.raises(ValueError, match=r"label 4 is outside \[0, 4\)"):
        rebuilt(y, t, torch.tensor([4, 0, 0, 0]))


@pytest.mark.parametrize("precond", ["VPPrecond", "VEPrecond", "EDMPrecond"])
def test_preconditioning_turns_an_exact_denoiser_into_the_exact_rf_velocity(precond):
    """For Gaussian data N(μ, s²) the ideal denoiser is D = μ + s²/(s² + σ²)·(x − μ); a network F that reproduces
    it under each wrapper's c_in, c_noise, c_skip, c_out must give the exact 1-RF velocity in project time."""
    mu, std = 0.3, 0.7
    constants = {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "sigma_data": 0.5}

    def sigma_of(noise):  # the inverse of each wrapper's c_noise
        if precond == "VPPrecond":
            t = noise / (constants["M"] - 1)
            return ((0.5 * constants["beta_d"] * t**2 + constants["beta_min"] * t).exp() - 1).sqrt()
        return 2 * noise.exp() if precond == "VEPrecond" else (4 * noise).exp()

    class IdealF(nn.Module):
        def forward(self, x_in, noise):
            s = sigma_of(noise).view(-1, 1, 1, 1)
            d2 = constants["sigma_data"] ** 2
            c_in = {"VPPrecond": 1 / (s**2 + 1).sqrt(), "VEPrecond": torch.ones_like(s)}.get(
                precond, 1 / (d2 + s**2).sqrt()
            )
            x = x_in / c_in
            denoised = mu + std**2 / (std**2 + s**2) * (x - mu)
            if precond == "EDMPrecond":
                return (denoised - d2 / (s**2 + d2) * x) / (s * d2**0.5 / (s**2 + d2).sqrt())
            return (denoised - x) / (-s if precond == "VPPrecond" else s)

    network = EdmPrecondNetwork(IdealF(), precond, constants)
    prediction = "sample" if precond == "EDMPrecond" else "epsilon"
    teacher = TeacherVelocity(network, edm(0.002, 80.0), prediction)
    t = torch.linspace(0.02, 0.99, 7, dtype=torch.float64)
    y = torch.randn(7, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(teacher(y, t), gaussian_rf_velocity(y, t, mu, std), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------- safety
MARKER_SOURCE = "import pathlib\npathlib.Path({path!r}).write_text('the pickle ran its code')\n"


def test_loading_runs_none_of_the_pickles_code(tmp_path, edm_names):
    marker = tmp_path / "marker.txt"
    source = MARKER_SOURCE.format(path=str(marker))
    path = write_edm_pickle(tmp_path / "net.pkl", edm_names, make_network(VPPrecond), module_src=source)
    load_model(path)
    describe_checkpoint(path)
    assert not marker.exists() and not HOOK_CALLS  # neither module_src nor the persistence hook ran
    exec(compile(source, "module_src", "exec"), {})  # the control: EDM's loader executes exactly this
    assert marker.read_text() == "the pickle ran its code"


class Payload:
    """An object whose unpickling calls `function(argument)`."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize(
    "function, code, name",
    [
        (os.system, "touch {path}", f"{os.system.__module__}.system"),
        (exec, "open({path!r}, 'w').write('x')", "builtins.exec"),
        (eval, "open({path!r}, 'w').write('x')", "builtins.eval"),
    ],
    ids=["os.system", "builtins.exec", "builtins.eval"],
)
def test_other_globals_are_refused_by_name_before_they_run(tmp_path, edm_names, function, code, name):
    marker = tmp_path / "marker.txt"
    network = make_network(VPPrecond)
    network.payload = Payload(function, code.format(path=str(marker)))  # inside a persistent object's state
    path = write_edm_pickle(tmp_path / "net.pkl", edm_names, network)
    with pytest.raises(CheckpointError, match=rf"the global {name}\b"):
        load_model(path)
    with pytest.raises(CheckpointError, match=rf"the global {name}\b"):
        read_edm_pickle(path)
    assert not marker.exists()


def test_a_class_of_the_pickles_own_code_is_refused_by_name(tmp_path, edm_names):
    network = make_network(VPPrecond)
    network.extra = nn.Identity()  # a torch class other than the containers: unpickling it would instantiate it
    path = write_edm_pickle(tmp_path / "net.pkl", edm_names, network)
    with pytest.raises(CheckpointError, match=r"the global torch\.nn\.modules\.linear\.Identity"):
        load_model(path)


# ------------------------------------------------------------------------------ what cannot be rebuilt
def test_unknown_classes_and_unsupported_options_are_named(tmp_path, edm_names):
    cases = {
        "unknown-wrapper": (make_network(VPPrecond), "unknown class 'MyPrecond'"),
        "unknown-unet": (make_network(VPPrecond), "unknown class 'MyUNet' inside VPPrecond"),
        "ncsnpp": (make_network(VPPrecond), r"embedding_type.*fourier.*NCSN\+\+"),
        "iddpm": (make_network(VPPrecond), r"iDDPMPrecond \(ADM's discrete-timestep wrapper\) is not supported"),
        "songunet-options-as-adm": (
            make_network(EDMPrecond),
            r"unknown DhariwalUNet argument\(s\) \[.*'embedding_type'",
        ),
    }

    class MyPrecond(VPPrecond):
        pass

    class MyUNet(SongUNet):
        pass

    class DhariwalUNet(SongUNet):  # ADM is rebuilt (tests/test_adm.py), but not with SongUNet's arguments
        pass

    class iDDPMPrecond(VPPrecond):
        pass

    cases["unknown-wrapper"][0].__class__ = MyPrecond  # subclasses pickle under their own class name
    cases["unknown-unet"][0].model.__class__ = MyUNet
    cases["ncsnpp"][0].model._init_kwargs["embedding_type"] = "fourier"
    cases["iddpm"][0].__class__ = iDDPMPrecond
    cases["songunet-options-as-adm"][0].model.__class__ = DhariwalUNet
    for name, (network, message) in cases.items():
        path = write_edm_pickle(tmp_path / f"{name}.pkl", edm_names, network)
        with pytest.raises(CheckpointError, match=message):
            load_model(path)
        assert "not loadable" in describe_checkpoint(path)["notes"][-1]


def test_missing_and_misshapen_tensors_are_named(tmp_path, edm_names):
    network = make_network(VPPrecond)
    del network.model.enc["8x8_block0"].conv1._parameters["bias"]
    path = write_edm_pickle(tmp_path / "missing.pkl", edm_names, network)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.enc\.8x8_block0\.conv1\.bias \(shape \(16,\)\)"):
        load_model(path)

    network = make_network(VPPrecond)
    network.model.dec["4x4_block1"].qkv.weight = nn.Parameter(torch.zeros(96, 33, 1, 1))
    path = write_edm_pickle(tmp_path / "shape.pkl", edm_names, network)
    with pytest.raises(
        CheckpointError, match=r"model\.dec\.4x4_block1\.qkv\.weight has shape \(96, 33, 1, 1\).*\(96, 32, 1, 1\)"
    ):
        load_model(path)

    network = make_network(VPPrecond)
    network.model.enc["4x4_down"].conv0.resample_filter = torch.full((1, 1, 4, 4), 1 / 16)  # NCSN++'s FIR size
    path = write_edm_pickle(tmp_path / "filter.pkl", edm_names, network)
    with pytest.raises(CheckpointError, match=r"4x4_down\.conv0\.resample_filter is not the \[1, 1\] box filter"):
        load_model(path)


# ------------------------------------------------------------------------------------------ teacher info
def test_teacher_info_reports_format_class_config_and_params(tmp_path, edm_names, capsys):
    network = make_network(VPPrecond)
    path = write_edm_pickle(tmp_path / "net.pkl", edm_names, network)
    info = describe_checkpoint(path)
    assert info["format"] == "edm-pickle"
    assert info["params"] == sum(p.numel() for p in network.parameters())
    arch = info["architecture"]
    assert arch["wrapper"] == "VPPrecond" and arch["network"] == "SongUNet" and arch["model_channels"] == 16
    assert arch["channel_mult"] == [1, 2, 2] and arch["beta_d"] == 19.9 and arch["img_resolution"] == 8
    assert arch["rebuilt_config"]["nf"] == 16 and arch["rebuilt_config"]["attn_resolutions"] == [4]
    augment = network.model.map_augment.weight.numel()
    assert f"({info['params'] - augment:,} params)" in " ".join(info["notes"])  # map_augment is not rebuilt
    assert info["prediction"] == "epsilon via VPPrecond" and "sigma in [0.002, 80]" in info["time_convention"]

    main(["teacher", "info", str(path)])
    printed = capsys.readouterr().out
    assert "format:          edm-pickle" in printed and 'wrapper: "VPPrecond"' in printed
    assert f"parameters:      {info['params']:,}" in printed


@pytest.mark.slow
def test_edm_cifar10_ddpmpp_configuration_at_full_size(tmp_path, edm_names):
    """EDM's CIFAR-10 DDPM++ settings (train.py --arch=ddpmpp): 32×32, model_channels 128, channel_mult [2, 2, 2],
    4 blocks, attention at 16, augment_dim 9; a 223 MB pickle."""
    options = {"model_channels": 128, "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16]}
    network = make_network(VPPrecond, resolution=32, dropout=0.13, **options)
    path = write_edm_pickle(tmp_path / "cifar10.pkl", edm_names, network)
    info = describe_checkpoint(path)
    assert info["params"] == sum(p.numel() for p in network.parameters()) == 55_733_891
    teacher = load_model(path)
    assert sum(p.numel() for p in teacher.parameters()) == 55_733_891 - 9 * 128  # without map_augment
    x, sigma = torch.randn(2, 3, 32, 32) * 3, torch.tensor([0.3, 20.0])
    with torch.no_grad():
        expected = network(x, sigma)
        denoised = x - sigma.view(-1, 1, 1, 1) * teacher.network(x, sigma)
    torch.testing.assert_close(denoised, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
