"""EDM `.pkl` networks rebuilt with the project's own code, as velocity teachers (`teachers.zoo.load_model`).

`teachers.edm_pickle` reads the file as data (class names, constructor arguments, tensors; no code runs). This
module rebuilds what it can:

- **SongUNet in its DDPM++ configuration** (embedding_type 'positional', channel_mult_noise 1, encoder_type and
  decoder_type 'standard', resample_filter [1, 1], channel_mult_emb 4; any model_channels, channel_mult,
  num_blocks, attn_resolutions, dropout, image size and channel count) becomes `teachers.unet.UNet` with
  time_scale 1, called on EDM's noise label c_noise. The two networks compute the same function: EDM's blocks
  are score_sde's BigGAN blocks with skip rescaling 1/√2, an attention block inside `UNetBlock` is the UNet's
  separate AttnBlock after its ResBlock, the enc/dec dictionaries list the blocks in the UNet's `all_modules`
  order, and EDM swaps its [cos, sin] embedding to [sin, cos] as the UNet's. Tensors are copied by name; the one
  rearrangement is attention: EDM's 1×1 `qkv` convolution interleaves q, k and v per channel (output channel
  3c + j), split here into the UNet's three NIN projections (transposed: NIN weights are (C_in, C_out)).
  `map_augment` (augmentation conditioning, no bias) is dropped: sampling feeds it no labels, so it adds nothing.
  A class-conditional SongUNet (label_dim K > 0) becomes the UNet with num_classes K: EDM's `map_label`, a Linear
  on the one-hot labels scaled by √K added to the [sin, cos] embedding, is the UNet's `map_label` tensor for tensor;
  EDM's all-zero label vector (its dropped label) is the UNet's NO_LABEL.
- **DhariwalUNet (ADM)**, any of its options (EDM's ImageNet-64 `edm-imagenet-64x64-cond-adm.pkl`, SlimFlow's
  ImageNet-64 students), becomes `teachers.adm.ADM` with time_scale 1, fed c_noise. That module is DhariwalUNet's
  layout with EDM's names, so the tensors load by name (`adm_state`); left out are the `resample_filter` buffers
  (checked to be the [1, 1] box filter: resampling is pooling there) and `map_augment` (as above). What the
  constructor arguments do not record is checked per module: each UNetBlock's skip_scale 1, adaptive_scale and
  head count, each GroupNorm's groups and eps (1e-5), each convolution's resampling. A class-conditional
  DhariwalUNet's `map_label` (a Linear without bias on the one-hot labels, added after `map_layer1`) is the ADM's;
  the all-zero label vector is NO_LABEL. `label_dropout` acts in training only and is not rebuilt.
- **VPPrecond / VEPrecond / EDMPrecond** become `teachers.adapters.TeacherVelocity` on EDM's path
  x = x0 + σ·n (schedule `edm`): VP and VE wrappers compute D = x ∓ σ·F, so F (VP) and −F (VE) are ε-predictions;
  EDMPrecond's D = c_skip·x + c_out·F is an x0-prediction. The σ range is EDM's sampler's, [0.002, 80], narrowed
  to the wrapper's own [sigma_min, sigma_max] (VE: [0.02, 80]).

Refused with the reason: NCSN++ options (Fourier embedding, FIR resampling, residual or skip encoder, skip
decoder), a constructor argument the network class does not have, in_channels ≠ out_channels, iDDPMPrecond (ADM's
discrete-timestep wrapper, whose network also predicts variances), and any other class.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimflow.checkpoint import CheckpointError, load_state_checked
from slimflow.flow import per_sample
from teachers.adapters import TeacherVelocity, edm
from teachers.adm import ADM, ADMBlock, build_adm
from teachers.edm_pickle import PickledObject, module_fields, module_tensors, parameter_count, submodules
from teachers.unet import AttnBlock, ResBlock, UNet, build_unet

# SongUNet's constructor, in order, with EDM's defaults (the first three have none)
SONGUNET_ARGUMENTS: dict[str, Any] = {
    "img_resolution": None,
    "in_channels": None,
    "out_channels": None,
    "label_dim": 0,
    "augment_dim": 0,
    "model_channels": 128,
    "channel_mult": [1, 2, 2, 2],
    "channel_mult_emb": 4,
    "num_blocks": 4,
    "attn_resolutions": [16],
    "dropout": 0.10,
    "label_dropout": 0,
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
}
# DhariwalUNet's constructor, in order, with EDM's defaults; every option is rebuilt by teachers.adm.ADM
DHARIWALUNET_ARGUMENTS: dict[str, Any] = {
    "img_resolution": None,
    "in_channels": None,
    "out_channels": None,
    "label_dim": 0,
    "augment_dim": 0,
    "model_channels": 192,
    "channel_mult": [1, 2, 3, 4],
    "channel_mult_emb": 4,
    "num_blocks": 3,
    "attn_resolutions": [32, 16, 8],
    "dropout": 0.10,
    "label_dropout": 0,
}
NETWORK_ARGUMENTS = {"SongUNet": SONGUNET_ARGUMENTS, "DhariwalUNet": DHARIWALUNET_ARGUMENTS}
SUPPORTED_NETWORKS = "SongUNet (DDPM++) or DhariwalUNet (ADM)"
DDPMPP_OPTIONS = {  # the SongUNet options teachers.unet.UNet reproduces
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
    "channel_mult_emb": 4,
}
PREDICTION = {"VPPrecond": "epsilon", "VEPrecond": "epsilon", "EDMPrecond": "sample"}
PRECOND_CONSTANTS = {
    "VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t", "sigma_min", "sigma_max"),
    "VEPrecond": ("sigma_min", "sigma_max"),
    "EDMPrecond": ("sigma_min", "sigma_max", "sigma_data"),
}
SAMPLER_SIGMA_RANGE = (0.002, 80.0)  # EDM's sampler default, clipped to each wrapper's own range
EDM_CONVENTION = (
    "EDM: x = x0 + sigma*n, a denoiser D(x; sigma); adapted to project time t = 1/(1 + sigma) "
    "(t=0 noise, t=1 data) by teachers.adapters"
)
# Project module -> EDM sub-module, per UNet block type
RESBLOCK_NAMES = {
    "GroupNorm_0": "norm0",
    "Conv_0": "conv0",
    "Dense_0": "affine",
    "GroupNorm_1": "norm1",
    "Conv_1": "conv1",
    "Conv_2": "skip",
}


class EdmPrecondNetwork(nn.Module):
    """EDM's preconditioning around a network F(c_in·x, c_noise): `(x, σ)` → ε̂ (VP, VE wrappers) or x̂0 (EDM).

    x is EDM's state x0 + σ·n; `network` is called as network(x_in, c_noise) with c_noise of shape (B,).
    """

    def __init__(self, network: nn.Module, precond: str, constants: dict[str, float]) -> None:
        super().__init__()
        if precond not in PREDICTION:
            raise ValueError(f"unknown EDM preconditioning {precond!r}; supported: {', '.join(PREDICTION)}")
        self.network = network
        self.precond = precond
        self.constants = dict(constants)

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        """The noise label each wrapper feeds its network (VP: (M − 1)·t(σ) with t the inverse of σ(t))."""
        if self.precond == "VPPrecond":
            beta_d, beta_min, steps = self.constants["beta_d"], self.constants["beta_min"], self.constants["M"]
            t = ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d
            return (steps - 1) * t
        if self.precond == "VEPrecond":
            return torch.log(0.5 * sigma)
        return torch.log(sigma) / 4

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        s = per_sample(sigma, x)
        noise = self.c_noise(sigma)
        extra = () if labels is None else (labels,)  # a class-conditional network's labels
        if self.precond == "VPPrecond":  # D = x − σ·F(x/√(σ² + 1)): F is the ε-prediction
            return self.network(x * torch.rsqrt(s * s + 1), noise, *extra)
        if self.precond == "VEPrecond":  # D = x + σ·F(x): −F is the ε-prediction
            return -self.network(x, noise, *extra)
        data = self.constants["sigma_data"]
        var = s * s + data * data
        out = self.network(x * torch.rsqrt(var), noise, *extra)
        return (data * data / var) * x + (s * data * torch.rsqrt(var)) * out


# ------------------------------------------------------------------------------------------- pickle → records
def edm_network(top: Any, where: str) -> PickledObject:
    """The network of an EDM pickle: its 'ema' entry (EDM snapshots hold ema, loss_fn, augment_pipe, dataset_kwargs)."""
    if isinstance(top, dict):
        if "ema" not in top:
            raise CheckpointError(f"{where}: an EDM pickle without an 'ema' network (keys {sorted(map(str, top))})")
        top = top["ema"]
    if not isinstance(top, PickledObject):
        raise CheckpointError(f"{where}: the EDM pickle's network is a {type(top).__name__}, not a persistent module")
    return top


def split_network(net: PickledObject, where: str) -> tuple[PickledObject, PickledObject]:
    """(preconditioning wrapper, its SongUNet or DhariwalUNet), or an error naming the class that cannot be rebuilt."""
    if net.class_name not in PREDICTION:
        if net.class_name in ("SongUNet", "DhariwalUNet"):
            reason = f"a bare {net.class_name} without the preconditioning wrapper that defines its inputs"
        elif net.class_name == "iDDPMPrecond":
            reason = "iDDPMPrecond (ADM's discrete-timestep wrapper) is not supported"
        else:
            reason = f"unknown class {net.class_name!r}"
        raise CheckpointError(f"{where}: {reason}; supported: {', '.join(PREDICTION)} around a {SUPPORTED_NETWORKS}")
    model = module_fields(net)[2].get("model")
    if not isinstance(model, PickledObject):
        raise CheckpointError(f"{where}: the {net.class_name} has no 'model' sub-module")
    if model.class_name not in NETWORK_ARGUMENTS:
        raise CheckpointError(
            f"{where}: unknown class {model.class_name!r} inside {net.class_name}; supported: {SUPPORTED_NETWORKS}"
        )
    return net, model


def network_options(model: PickledObject, where: str) -> dict[str, Any]:
    """The SongUNet's or DhariwalUNet's constructor arguments (recorded by EDM's persistence) completed with EDM's
    defaults; an argument the class does not have is refused by name."""
    defaults = NETWORK_ARGUMENTS[model.class_name]
    args, kwargs = model.state.get("_init_args"), model.state.get("_init_kwargs")
    if not isinstance(kwargs, dict) or not isinstance(args, tuple | list):
        raise CheckpointError(
            f"{where}: the {model.class_name} does not record its constructor arguments (_init_kwargs)"
        )
    names = list(defaults)
    unknown = sorted(set(kwargs) - set(names)) + ([f"{len(args)} positional"] if len(args) > len(names) else [])
    if unknown:
        raise CheckpointError(f"{where}: unknown {model.class_name} argument(s) {unknown}; known: {names}")
    options = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
    missing = [k for k, v in options.items() if v is None]
    if missing:
        raise CheckpointError(f"{where}: the {model.class_name}'s arguments lack {missing}")
    return {k: _plain(v) for k, v in options.items()}


def _plain(value: Any) -> Any:
    """Numpy scalars and tuples of the pickle as Python numbers and lists (for comparisons and JSON)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


def check_channels(options: dict[str, Any], where: str) -> None:
    """A velocity network maps an image to one of the same shape: in_channels must equal out_channels."""
    if options["in_channels"] != options["out_channels"]:
        raise CheckpointError(
            f"{where}: in_channels={options['in_channels']} differs from out_channels={options['out_channels']}"
        )


def check_ddpmpp(options: dict[str, Any], where: str) -> None:
    """Refuse, naming the options, what `teachers.unet.UNet` does not reproduce."""
    check_channels(options, where)
    differ = {k: options[k] for k, v in DDPMPP_OPTIONS.items() if options[k] != v}
    if differ:
        raise CheckpointError(
            f"{where}: SongUNet with {differ} is not supported: only its DDPM++ configuration {DDPMPP_OPTIONS} is "
            "rebuilt (NCSN++'s Fourier embedding, FIR resampling and residual encoder have no implementation here)"
        )


def unet_config(options: dict[str, Any]) -> dict[str, Any]:
    """The `teachers.unet` config of a DDPM++ SongUNet (time_scale 1: the UNet is fed EDM's c_noise itself);
    attention resolutions the network does not have are dropped."""
    resolution, levels = int(options["img_resolution"]), len(options["channel_mult"])
    resolutions = [resolution >> level for level in range(levels)]
    return {
        "in_channels": int(options["in_channels"]),
        "resolution": resolution,
        "nf": int(options["model_channels"]),
        "ch_mult": [int(m) for m in options["channel_mult"]],
        "num_res_blocks": int(options["num_blocks"]),
        "attn_resolutions": [r for r in resolutions if r in options["attn_resolutions"]],
        "dropout": float(options["dropout"]),
        "time_scale": 1.0,
        **({"num_classes": int(options["label_dim"])} if options["label_dim"] else {}),
    }


def adm_config(options: dict[str, Any]) -> dict[str, Any]:
    """The `teachers.adm` config of a DhariwalUNet (time_scale 1: the ADM is fed EDM's c_noise itself).

    augment_dim (map_augment) and label_dropout (training only) have no counterpart: see `describe_edm`;
    attention resolutions the network does not have are dropped (EDM ignores them). The keys they share are read
    as for a SongUNet (`unet_config`)."""
    return {"arch": "adm", **unet_config(options), "emb_mult": int(options["channel_mult_emb"])}


def precond_constants(precond: PickledObject, where: str) -> dict[str, float]:
    values = {key: precond.state.get(key) for key in PRECOND_CONSTANTS[precond.class_name]}
    bad = [k for k, v in values.items() if not isinstance(_plain(v), int | float)]
    if bad:
        raise CheckpointError(f"{where}: the {precond.class_name} lacks numeric {bad}")
    return {k: float(_plain(v)) for k, v in values.items()}


def sigma_range(constants: dict[str, float]) -> tuple[float, float]:
    """EDM's sampler range [0.002, 80] clipped to the wrapper's [sigma_min, sigma_max] (as EDM's sampler does)."""
    return max(SAMPLER_SIGMA_RANGE[0], constants["sigma_min"]), min(SAMPLER_SIGMA_RANGE[1], constants["sigma_max"])


# ------------------------------------------------------------------------------------------ tensors → UNet
class _Mapping:
    """Collects the UNet's state dict from the EDM tensors, and every difference found on the way."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()
        self.state: dict[str, torch.Tensor] = {}
        self.problems: list[str] = []

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        self.used.add(name)
        tensor = self.tensors.get(name)
        if tensor is None:
            self.problems.append(f"missing tensor {name} (shape {tuple(shape)})")
        elif tuple(tensor.shape) != tuple(shape):
            self.problems.append(f"{name} has shape {tuple(tensor.shape)}, the DDPM++ layout needs {tuple(shape)}")
        else:
            return tensor
        return None

    def copy(self, edm_module: str, project: str, module: nn.Module, names: dict[str, str] | None = None) -> None:
        """Every tensor of `module` (UNet name `project`) from the EDM module of the same layout, renamed by `names`."""
        for key, own in module.state_dict().items():
            head, _, rest = key.partition(".")
            edm_key = f"{names[head]}.{rest}" if names else key
            tensor = self.take(f"{edm_module}.{edm_key}", tuple(own.shape))
            if tensor is not None:
                self.state[f"{project}.{key}"] = tensor

    def attention(self, edm_module: str, project: str, block: nn.Module) -> None:
        """EDM's qkv 1×1 conv (output channel 3c + j: q, k, v interleaved) and proj → NIN_0..2 and NIN_3."""
        channels = block.NIN_0.W.shape[0]
        for key in ("weight", "bias"):
            tensor = self.take(f"{edm_module}.norm2.{key}", (channels,))
            if tensor is not None:
                self.state[f"{project}.GroupNorm_0.{key}"] = tensor
        qkv_w = self.take(f"{edm_module}.qkv.weight", (3 * channels, channels, 1, 1))
        qkv_b = self.take(f"{edm_module}.qkv.bias", (3 * channels,))
        proj_w = self.take(f"{edm_module}.proj.weight", (channels, channels, 1, 1))
        proj_b = self.take(f"{edm_module}.proj.bias", (channels,))
        if qkv_w is not None and qkv_b is not None:
            for j in range(3):
                self.state[f"{project}.NIN_{j}.W"] = qkv_w[j::3, :, 0, 0].t().contiguous()
                self.state[f"{project}.NIN_{j}.b"] = qkv_b[j::3].clone()
        if proj_w is not None and proj_b is not None:
            self.state[f"{project}.NIN_3.W"] = proj_w[:, :, 0, 0].t().contiguous()
            self.state[f"{project}.NIN_3.b"] = proj_b.clone()

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)


def _close(value: Any, target: float) -> bool:
    value = _plain(value)
    return isinstance(value, int | float) and math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-12)


def _edm_blocks(model: PickledObject, where: str) -> list[tuple[str, PickledObject]]:
    """SongUNet's modules in forward order: the two mapping layers, then enc and dec in insertion order."""
    modules = module_fields(model)[2]
    missing = [k for k in ("map_noise", "map_layer0", "map_layer1", "enc", "dec") if k not in modules]
    if missing:
        raise CheckpointError(f"{where}: the SongUNet has no {missing} module(s)")
    blocks = [("model.map_layer0", modules["map_layer0"]), ("model.map_layer1", modules["map_layer1"])]
    for part in ("enc", "dec"):
        blocks += [(f"model.{part}.{k}", v) for k, v in module_fields(modules[part])[2].items()]
    return blocks


def _check_block(mapping: _Mapping, name: str, record: PickledObject, res_block: nn.Module, attention: bool) -> None:
    """EDM's UNetBlock attributes that the UNet's ResBlock (+ AttnBlock) hard-codes."""
    state = record.state
    mapping.check(
        _close(state.get("skip_scale"), math.sqrt(0.5)),
        f"{name}.skip_scale is {state.get('skip_scale')}, not sqrt(1/2)",
    )
    mapping.check(not state.get("adaptive_scale"), f"{name} uses adaptive_scale (ADM's scale-shift), not DDPM++'s bias")
    mapping.check(
        _plain(state.get("num_heads")) in (0, 1) and bool(state.get("num_heads")) == attention,
        f"{name}.num_heads is {state.get('num_heads')}; the UNet has {'single-head' if attention else 'no'} attention here",
    )
    convs = module_fields(record)[2]
    for conv in ("conv0", "skip"):
        if conv not in convs:
            continue
        up, down = bool(convs[conv].state.get("up")), bool(convs[conv].state.get("down"))
        mapping.check(
            (up, down) == (res_block.up, res_block.down),
            f"{name}.{conv} resamples (up={up}, down={down}) where the UNet's block has up={res_block.up}, down={res_block.down}",
        )
        mapping.check(not convs[conv].state.get("fused_resample"), f"{name}.{conv} uses fused resampling")
        if up or down:
            key = f"{name}.{conv}.resample_filter"
            mapping.used.add(key)
            problem = _box_filter_problem(mapping.tensors, key)
            mapping.check(problem is None, problem or "")


def _box_filter_problem(tensors: dict[str, torch.Tensor], key: str) -> str | None:
    """None if `tensors[key]` is EDM's [1, 1] resampling filter (2×2 of 1/4), else what is wrong."""
    found = tensors.get(key)
    if found is not None and found.shape == (1, 1, 2, 2) and bool(torch.allclose(found, torch.full_like(found, 0.25))):
        return None
    return f"{key} is not the [1, 1] box filter (shape {None if found is None else tuple(found.shape)})"


def _check_norms(mapping: _Mapping, name: str, record: PickledObject, project: nn.Module) -> None:
    """Every EDM GroupNorm under `record` against the UNet's GroupNorms in the same order (groups and eps)."""
    edm_norms = [(n, r) for n, r in submodules(record, name).items() if r.class_name == "GroupNorm"]
    own = [m for m in project.modules() if isinstance(m, nn.GroupNorm)]
    for (norm_name, norm), module in zip(edm_norms, own, strict=False):
        groups, eps = _plain(norm.state.get("num_groups")), norm.state.get("eps")
        mapping.check(groups == module.num_groups, f"{norm_name} has {groups} groups, the UNet {module.num_groups}")
        mapping.check(_close(eps, module.eps), f"{norm_name}.eps is {eps}, the UNet's {module.eps}")


def songunet_state(model: PickledObject, tensors: dict[str, torch.Tensor], unet: UNet, where: str) -> dict:
    """The UNet state dict holding the SongUNet's tensors (names under 'model.'), or an error listing differences."""
    mapping = _Mapping(tensors)
    embedding = module_fields(model)[2]["map_noise"]
    mapping.check(
        embedding.class_name == "PositionalEmbedding"
        and _plain(embedding.state.get("num_channels")) == unet.nf
        and embedding.state.get("endpoint") is True
        and _close(embedding.state.get("max_positions"), 10000),
        f"model.map_noise is not DDPM++'s positional embedding of {unet.nf} channels (endpoint=True, max_positions "
        f"10000): {embedding.class_name} { ({k: embedding.state.get(k) for k in ('num_channels', 'endpoint', 'max_positions')}) }",
    )
    modules = list(unet.all_modules)
    index = 0
    for name, record in _edm_blocks(model, where):
        if index >= len(modules):
            mapping.problems.append(f"{name} ({record.class_name}) has no counterpart: the UNet has fewer blocks")
            break
        project, module = f"all_modules.{index}", modules[index]
        kind = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "GroupNorm": nn.GroupNorm}.get(record.class_name)
        if record.class_name == "UNetBlock" and isinstance(module, ResBlock):
            attention = "qkv" in module_fields(record)[2]
            _check_block(mapping, name, record, module, attention)
            mapping.copy(name, project, module, RESBLOCK_NAMES)
            _check_norms(mapping, name, record, module)
            index += 1
            if attention:
                if index >= len(modules) or not isinstance(modules[index], AttnBlock):
                    mapping.problems.append(f"{name} has attention where the UNet (all_modules.{index}) has none")
                    break
                mapping.attention(name, f"all_modules.{index}", modules[index])
                _check_norms(mapping, f"{name}.norm2", module_fields(record)[2]["norm2"], modules[index])
                index += 1
        elif kind is not None and isinstance(module, kind):
            mapping.copy(name, project, module)
            if record.class_name == "GroupNorm":
                _check_norms(mapping, name, record, module)
            index += 1
        else:
            mapping.problems.append(
                f"{name} ({record.class_name}) stands where the DDPM++ UNet has {project} ({type(module).__name__}): "
                "the blocks do not follow the DDPM++ layout"
            )
            break
    if not mapping.problems and index != len(modules):
        mapping.problems.append(f"the SongUNet has fewer blocks than the DDPM++ UNet ({index} of {len(modules)})")
    if unet.map_label is not None:  # a class-conditional SongUNet: map_label is the UNet's, tensor for tensor
        mapping.copy("model.map_label", "map_label", unet.map_label)
    mapping.used.add("model.map_augment.weight")
    unexpected = sorted(set(tensors) - mapping.used)
    if unexpected:
        mapping.problems.append(f"tensors not in the DDPM++ layout: {', '.join(unexpected[:6])}")
    if mapping.problems:
        shown = "; ".join(mapping.problems[:8]) + (
            f" (+{len(mapping.problems) - 8} more)" if len(mapping.problems) > 8 else ""
        )
        raise CheckpointError(f"{where}: the SongUNet does not match the DDPM++ layout: {shown}")
    return mapping.state


# ------------------------------------------------------------------------------------------- tensors → ADM
def _adm_record_problems(name: str, record: PickledObject, own: nn.Module | None, block: ADMBlock | None) -> list[str]:
    """Differences between one EDM module of a DhariwalUNet (`name` under 'model.') and its teachers.adm counterpart
    (`own`, None if absent; `block`: the ADMBlock it belongs to)."""
    state, where = record.state, f"model.{name}"
    if record.class_name == "UNetBlock":
        return [
            message
            for ok, message in (
                (_close(state.get("skip_scale"), 1.0), f"{where}.skip_scale is {state.get('skip_scale')}, not 1"),
                (state.get("adaptive_scale") is True, f"{where} does not use adaptive_scale (ADM's scale-shift)"),
                (
                    _plain(state.get("num_heads")) == getattr(own, "num_heads", None),
                    f"{where}.num_heads is {state.get('num_heads')}, ADM's 64 channels per head give "
                    f"{getattr(own, 'num_heads', None)}",
                ),
            )
            if not ok
        ]
    if record.class_name == "GroupNorm":
        if not isinstance(own, nn.GroupNorm):
            return [f"{where} is a GroupNorm where the ADM has {type(own).__name__}"]
        groups, eps = _plain(state.get("num_groups")), state.get("eps")
        problems = [] if groups == own.num_groups else [f"{where} has {groups} groups, the ADM {own.num_groups}"]
        return problems + ([] if _close(eps, own.eps) else [f"{where}.eps is {eps}, the ADM's {own.eps}"])
    if record.class_name == "Conv2d":
        resampling = name.rpartition(".")[2] in ("conv0", "skip") and block is not None
        expected = (block.up, block.down) if resampling else (False, False)
        found = (bool(state.get("up")), bool(state.get("down")))
        problems = [] if found == expected else [f"{where} resamples (up, down) = {found}, the ADM {expected}"]
        if state.get("fused_resample"):
            problems.append(f"{where} uses fused resampling")
        if own is None and "weight" in module_fields(record)[0]:
            problems.append(f"{where} has a weight where the ADM has no skip convolution")
        return problems
    if record.class_name in ("Linear", "torch.nn.modules.container.ModuleDict"):
        return []
    return [f"{where} is a {record.class_name}, which DhariwalUNet does not hold"]


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def adm_state(model: PickledObject, tensors: dict[str, torch.Tensor], adm: ADM, where: str) -> dict:
    """The ADM state dict of a DhariwalUNet's tensors (names under 'model.'), after checking what its constructor
    arguments do not record (block attributes, norms, resampling); `load_state_checked` then checks every tensor."""
    problems = []
    embedding = module_fields(model)[2].get("map_noise")
    found = {k: _plain(getattr(embedding, "state", {}).get(k)) for k in ("num_channels", "endpoint", "max_positions")}
    if getattr(embedding, "class_name", None) != "PositionalEmbedding" or found != {
        "num_channels": adm.nf,
        "endpoint": False,
        "max_positions": 10000,
    }:
        problems.append(
            f"model.map_noise is not ADM's positional embedding of {adm.nf} channels (endpoint False, max_positions "
            f"10000): {getattr(embedding, 'class_name', None)} {found}"
        )
    for name, record in submodules(model).items():
        if name in ("", "map_noise", "map_augment"):
            continue
        own, parent = _submodule(adm, name), _submodule(adm, name.rpartition(".")[0])
        block = parent if isinstance(parent, ADMBlock) else own if isinstance(own, ADMBlock) else None
        if own is None and record.class_name != "Conv2d":  # a resample-only skip (no weight) has no module here
            problems.append(f"model.{name} ({record.class_name}) has no counterpart in the ADM")
            continue
        problems += _adm_record_problems(name, record, own, block)
    state = {}
    for key, tensor in tensors.items():
        if key.endswith(".resample_filter"):
            problems += [p for p in [_box_filter_problem(tensors, key)] if p]
        elif key != "model.map_augment.weight":
            state[key.removeprefix("model.")] = tensor
    if problems:
        shown = "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        raise CheckpointError(f"{where}: the DhariwalUNet does not match the ADM layout: {shown}")
    return state


# ----------------------------------------------------------------------------------------------- entry points
def rebuild_network(model: PickledObject, options: dict[str, Any], tensors: dict, where: str) -> UNet | ADM:
    """The project network holding the SongUNet's (teachers.unet.UNet) or DhariwalUNet's (teachers.adm.ADM) tensors."""
    if model.class_name == "SongUNet":
        check_ddpmpp(options, where)
        build, config = build_unet, unet_config(options)
    else:
        check_channels(options, where)
        build, config = build_adm, adm_config(options)
    try:
        network = build(config)
    except ValueError as err:
        raise CheckpointError(f"{where}: the {model.class_name}'s options do not make a network here ({err})") from None
    state = songunet_state if model.class_name == "SongUNet" else adm_state
    load_state_checked(network, state(model, tensors, network, where), where)
    return network.eval()


def load_edm_teacher(top: Any, path: str | Path) -> TeacherVelocity:
    """The network of an EDM pickle (as `teachers.edm_pickle.read_edm_pickle` returns it) as a velocity teacher."""
    where = repr(str(path))
    precond, model = split_network(edm_network(top, where), where)
    options = network_options(model, where)
    constants = precond_constants(precond, where)
    wrapper_labels = int(_plain(precond.state.get("label_dim")) or 0)
    if wrapper_labels != int(options["label_dim"] or 0):
        raise CheckpointError(
            f"{where}: the {precond.class_name} has label_dim={wrapper_labels}, its {model.class_name} "
            f"{options['label_dim']}"
        )
    tensors = {k: v.float() for k, v in module_tensors(precond).items()}
    network = rebuild_network(model, options, tensors, where)
    lo, hi = sigma_range(constants)
    shape = (network.in_channels, network.resolution, network.resolution)
    wrapped = EdmPrecondNetwork(network, precond.class_name, constants)
    teacher = TeacherVelocity(wrapped, edm(lo, hi), PREDICTION[precond.class_name], shape, network.num_classes)
    return teacher.eval().requires_grad_(False)


def describe_edm(top: Any, path: str | Path) -> dict:
    """`slimflow teacher info` of an EDM pickle: wrapper, network class and options, parameters; whether it loads."""
    where = repr(str(path))
    net = edm_network(top, where)
    model = module_fields(net)[2].get("model")
    options = {k: _plain(v) for k, v in (getattr(model, "state", {}).get("_init_kwargs") or {}).items()}
    if getattr(model, "class_name", None) in NETWORK_ARGUMENTS:
        try:
            options = network_options(model, where)
        except CheckpointError:
            pass  # described with what it records; the load below names the problem
    wrapper_keys = ("img_resolution", "img_channels", *PRECOND_CONSTANTS.get(net.class_name, ()))
    constants = {k: _plain(net.state[k]) for k in wrapper_keys if k in net.state}
    architecture = {"wrapper": net.class_name, "network": getattr(model, "class_name", None), **constants, **options}
    notes = []
    if isinstance(top, dict):
        others = {k: getattr(v, "class_name", None if v is None else type(v).__name__) for k, v in top.items()}
        notes.append(f"'ema' network described; the pickle also holds {dict(list(others.items())[1:])}")
    try:
        teacher = load_edm_teacher(top, path)
    except CheckpointError as err:
        notes.append(f"not loadable: {str(err).removeprefix(where + ': ')}")
        prediction, convention = "unknown (not loadable)", EDM_CONVENTION
    else:
        network = teacher.network.network
        rebuilt = sum(p.numel() for p in network.parameters())
        architecture["rebuilt_config"] = network.config
        kind = f"{type(network).__module__}.{type(network).__name__}"
        notes.append(f"rebuilt as {kind} ({rebuilt:,} params); the pickle's module source was not run")
        if options.get("augment_dim"):
            notes.append(f"map_augment ({options['augment_dim']} augmentation labels) dropped: sampling gives it none")
        if options.get("label_dropout"):
            notes.append(f"label_dropout {options['label_dropout']} is training-only: sampling is unaffected")
        lo, hi = sigma_range(constants)
        prediction = (
            f"{'epsilon' if PREDICTION[net.class_name] == 'epsilon' else 'x0 (denoiser D)'} via {net.class_name}"
        )
        convention = f"{EDM_CONVENTION}; sigma in [{lo:g}, {hi:g}]"
    if net.state.get("use_fp16"):
        notes.append("use_fp16=True in the pickle; the rebuilt network runs in float32")
    return {
        "architecture": architecture,
        "params": parameter_count(net),
        "tensors": len(module_tensors(net)),
        "prediction": prediction,
        "time_convention": convention,
        "notes": notes,
    }
