"""Build velocity networks from config, and the one loader of every model file the project accepts.

`load_model(path)` reads, by content (see `teachers.formats`): the project's exported models (`.safetensors` +
`.json` sidecar, pruned ones included) and training runs/checkpoints (EMA weights), reference DDPM++ `.pth`
checkpoints (give `resolution`), diffusers folders and EDM `.pkl` networks (adapted to the project's velocity
convention; `teachers.edm`). The model it returns is on `device`, in eval mode, frozen, with two attributes every
stage reads:
- `sample_shape`: (C, H, W) of one sample;
- `one_step_time`: the time t0 its one-step generator z + v(z, t0) is evaluated at (recorded by distillation in
  the sidecar; 0 for every other model).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from pruning.unstructured import attach_masks, masks_of, ones_masks
from slimflow.checkpoint import CheckpointError, check_config, load_state_checked, read_model_file, shipped_path
from teachers.adapters import load_diffusers_teacher
from teachers.adm import ADM_PRESETS, build_adm
from teachers.edm import load_edm_teacher
from teachers.formats import detect, load_reference, slimflow_model_path
from teachers.pruned import apply_pruning_record
from teachers.unet import PRESETS, UNET_KEYS, build_unet

# Every named architecture: DDPM++ UNets (teachers.unet) and ADMs (teachers.adm, configs with arch 'adm')
MODEL_PRESETS = {**PRESETS, **ADM_PRESETS}
ARCHITECTURES = {None: build_unet, "adm": build_adm}  # config["arch"] -> builder; no arch: the DDPM++ UNet


def resolve_model_config(spec: dict) -> dict:
    """`{preset: name, key: value...}` -> the full network config (preset values overridden by the given keys)."""
    spec = dict(spec)
    name = spec.pop("preset", None)
    if name is None:
        return spec
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(sorted(MODEL_PRESETS))}")
    return {**MODEL_PRESETS[name], **spec}


def build_network(config: dict) -> torch.nn.Module:
    """The network of a full config: an ADM for `arch: adm`, the DDPM++ UNet for a config without `arch`."""
    arch = config.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model arch {arch!r}; known: 'adm', or no arch key for the DDPM++ UNet")
    return ARCHITECTURES[arch](config)


def build_model(spec: dict) -> torch.nn.Module:
    return build_network(resolve_model_config(spec))


def build_from_sidecar(sidecar: dict) -> torch.nn.Module:
    """The (untrained) network a model file's sidecar describes: its UNet or ADM config, with the channels of its
    `pruning` record removed when the model was pruned (see slimflow.stages.prune)."""
    model = build_network(sidecar["model"])
    if sidecar.get("pruning"):
        apply_pruning_record(model, sidecar["pruning"])
    if sidecar.get("weight_masks"):  # a sparse model: its state dict holds the masks (pruning.attach_masks)
        attach_masks(model, ones_masks(model, sidecar["weight_masks"]["layers"]))
    return model


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    expect: dict | None = None,
    resolution: int | None = None,
    unsafe_pickle: bool = False,
) -> torch.nn.Module:
    """The model at `path` as a velocity field v(x, t) in the project's convention (see the module docstring).

    `expect`: the architecture config the caller requires of a project model file (any difference is an error);
    `resolution`: the image size of a reference DDPM++ checkpoint, which does not record it; `unsafe_pickle`:
    allow a torch file that pickles code (only for files you trust)."""
    path = shipped_path(path)
    fmt, obj = detect(path, unsafe_pickle)
    one_step_time = 0.0
    if fmt in ("slimflow-checkpoint", "slimflow-model"):
        model, sidecar = _project_model(slimflow_model_path(path), expect)
        one_step_time = float(sidecar.get("one_step_time") or 0.0)
    elif fmt == "reference-ddpmpp":
        if resolution is None:
            raise ValueError(
                f"{str(path)!r} is a reference DDPM++ checkpoint, which does not record its image "
                "resolution: pass resolution= (32 for the CIFAR-10 models)"
            )
        model = load_reference(obj, resolution, path)[0]
    elif fmt == "diffusers":
        model = load_diffusers_teacher(path)
    elif fmt == "edm-pickle":
        model = load_edm_teacher(obj, path)
    else:
        raise CheckpointError(
            f"{str(path)!r} is a plain state dict: it does not record its architecture, so it "
            "cannot be loaded as a model; export it with its config "
            "(slimflow.checkpoint.save_model)"
        )
    if getattr(model, "sample_shape", None) is None:
        config = getattr(model, "config", None)
        if not isinstance(config, dict):
            raise ValueError(f"the model {str(path)!r} does not record its sample shape (C, H, W)")
        model.sample_shape = (config["in_channels"], config["resolution"], config["resolution"])
    model.one_step_time = one_step_time
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if bad:
        warnings.warn(
            f"{str(path)!r} has non-finite (NaN/inf) values in {len(bad)} tensor(s), e.g. {bad[0]}: what it "
            "generates will be NaN",
            stacklevel=2,
        )
    return model.to(device).eval().requires_grad_(False)


def _project_model(path: Path, expect: dict | None) -> tuple[torch.nn.Module, dict]:
    sidecar, weights = read_model_file(path)
    config = sidecar.get("model")
    if not config:
        raise CheckpointError(f"{str(path)!r} does not record its model config")
    missing = [key for key in UNET_KEYS if key not in config]
    if missing:  # e.g. the domain classifier's file: a project model file, but no flow
        raise CheckpointError(
            f"{str(path)!r} is not a velocity model (a flow's v(x, t), whose one-step generator is z + v(z, t0)): "
            f"its sidecar describes a {sidecar.get('kind') or 'non-UNet'} network with config keys {sorted(config)}, "
            f"without the UNet's {missing}; give a teacher or student model file"
        )
    if expect is not None:
        check_config(resolve_model_config(expect), config, str(path))
    model = build_from_sidecar(sidecar)
    load_state_checked(model, weights, str(path))
    if (masks := masks_of(model)) is not None:
        masks.apply(model)  # pruned weights are zero whatever the file holds
    return model, sidecar
