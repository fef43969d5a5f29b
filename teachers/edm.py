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
- **VPPrecond / VEPrecond / EDMPrecond** become `teachers.adapters.TeacherVelocity` on EDM's path
  x = x0 + σ·n (schedule `edm`): VP and VE wrappers compute D = x ∓ σ·F, so F (VP) and −F (VE) are ε-predictions;
  EDMPrecond's D = c_skip·x + c_out·F is an x0-prediction. The σ range is EDM's sampler's, [0.002, 80], narrowed
  to the wrapper's own [sigma_min, sigma_max] (VE: [0.02, 80]).

Refused with the reason: NCSN++ options (Fourier embedding, FIR resampling,
residual or skip encoder, skip decoder), DhariwalUNet (ADM) and iDDPMPrecond, and any other class.
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
    """(preconditioning wrapper, its SongUNet), or an error naming the class that cannot be rebuilt."""
    if net.class_name not in PREDICTION:
        if net.class_name in ("SongUNet", "DhariwalUNet"):
            reason = f"a bare {net.class_name} without the preconditioning wrapper that defines its inputs"
        elif net.class_name == "iDDPMPrecond":
            reason = "iDDPMPrecond (ADM's discrete-timestep wrapper) is not supported"
        else:
            reason = f"unknown class {net.class_name!r}"
        raise CheckpointError(f"{where}: {reason}; supported: {', '.join(PREDICTION)} around a SongUNet (DDPM++)")
    model = module_fields(net)[2].get("model")
    if not isinstance(model, PickledObject):
        raise CheckpointError(f"{where}: the {net.class_name} has no 'model' sub-module")
    if model.class_name == "DhariwalUNet":
        options = model.state.get("_init_kwargs") or {}
        shown = {
            k: options[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions") if k in options
        }
        raise CheckpointError(
            f"{where}: DhariwalUNet (ADM, {shown}) has no implementation in this project; "
            "only SongUNet in its DDPM++ configuration is rebuilt"
        )
    if model.class_name != "SongUNet":
        raise CheckpointError(
            f"{where}: unknown class {model.class_name!r} inside {net.class_name}; supported: SongUNet (DDPM++)"
        )
    return net, model


def songunet_options(model: PickledObject, where: str) -> dict[str, Any]:
    """SongUNet's constructor arguments (recorded by EDM's persistence) completed with EDM's defaults."""
    args, kwargs = model.state.get("_init_args"), model.state.get("_init_kwargs")
    if not isinstance(kwargs, dict) or not isinstance(args, tuple | list):
        raise CheckpointError(f"{where}: the SongUNet does not record its constructor arguments (_init_kwargs)")
    names = list(SONGUNET_ARGUMENTS)
    unknown = sorted(set(kwargs) - set(names)) + ([f"{len(args)} positional"] if len(args) > len(names) else [])
    if unknown:
        raise CheckpointError(f"{where}: unknown SongUNet argument(s) {unknown}; known: {names}")
    options = {**SONGUNET_ARGUMENTS, **dict(zip(names, args, strict=False)), **kwargs}
    missing = [k for k, v in options.items() if v is None]
    if missing:
        raise CheckpointError(f"{where}: the SongUNet's arguments lack {missing}")
    return {k: _plain(v) for k, v in options.items()}


def _plain(value: Any) -> Any:
    """Numpy scalars and tuples of the pickle as Python numbers and lists (for comparisons and JSON)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


def check_ddpmpp(options: dict[str, Any], where: str) -> None:
    """Refuse, naming the options, what `teachers.unet.UNet` does not reproduce."""
    if options["in_channels"] != options["out_channels"]:
        raise CheckpointError(
            f"{where}: in_channels={options['in_channels']} differs from out_channels={options['out_channels']}"
        )
    differ = {k: options[k] for k, v in DDPMPP_OPTIONS.items() if options[k] != v}
    if differ:
        raise CheckpointError(
            f"{where}: SongUNet with {differ} is not supported: only its DDPM++ configuration {DDPMPP_OPTIONS} is "
            "rebuilt (NCSN++'s Fourier embedding, FIR resampling and residual encoder have no implementation here)"
        )


def unet_config(options: dict[str, Any]) -> dict[str, Any]:
    """The `teachers.unet` config of a DDPM++ SongUNet (time_scale 1: the UNet is fed EDM's c_noise itself)."""
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
            found = mapping.tensors.get(key)
            mapping.check(
                found is not None
                and found.shape == (1, 1, 2, 2)
                and bool(torch.allclose(found, torch.full_like(found, 0.25))),
                f"{key} is not the [1, 1] box filter (shape {None if found is None else tuple(found.shape)})",
            )


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


# ----------------------------------------------------------------------------------------------- entry points
def load_edm_teacher(top: Any, path: str | Path) -> TeacherVelocity:
    """The network of an EDM pickle (as `teachers.edm_pickle.read_edm_pickle` returns it) as a velocity teacher."""
    where = repr(str(path))
    precond, model = split_network(edm_network(top, where), where)
    options = songunet_options(model, where)
    check_ddpmpp(options, where)
    constants = precond_constants(precond, where)
    wrapper_labels = int(_plain(precond.state.get("label_dim")) or 0)
    if wrapper_labels != int(options["label_dim"] or 0):
        raise CheckpointError(
            f"{where}: the {precond.class_name} has label_dim={wrapper_labels}, its SongUNet {options['label_dim']}"
        )
    try:
        unet = build_unet(unet_config(options))
    except ValueError as err:
        raise CheckpointError(f"{where}: the SongUNet's options do not make a DDPM++ UNet here ({err})") from None
    tensors = {k: v.float() for k, v in module_tensors(precond).items()}
    load_state_checked(unet, songunet_state(model, tensors, unet, where), where)
    network = EdmPrecondNetwork(unet.eval(), precond.class_name, constants)
    lo, hi = sigma_range(constants)
    shape = (unet.in_channels, unet.resolution, unet.resolution)
    teacher = TeacherVelocity(network, edm(lo, hi), PREDICTION[precond.class_name], shape, unet.num_classes)
    return teacher.eval().requires_grad_(False)


def describe_edm(top: Any, path: str | Path) -> dict:
    """`slimflow teacher info` of an EDM pickle: wrapper, network class and options, parameters; whether it loads."""
    where = repr(str(path))
    net = edm_network(top, where)
    model = module_fields(net)[2].get("model")
    options = {k: _plain(v) for k, v in (getattr(model, "state", {}).get("_init_kwargs") or {}).items()}
    if getattr(model, "class_name", None) == "SongUNet":
        try:
            options = songunet_options(model, where)
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
        unet = teacher.network.network
        rebuilt = sum(p.numel() for p in unet.parameters())
        architecture["project_unet"] = unet.config
        notes.append(f"rebuilt as teachers.unet.UNet ({rebuilt:,} params); the pickle's module source was not run")
        if options.get("augment_dim"):
            notes.append(f"map_augment ({options['augment_dim']} augmentation labels) dropped: sampling gives it none")
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
