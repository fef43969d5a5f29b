"""Build velocity networks from config and load them from the project's model files."""
from __future__ import annotations

from pathlib import Path

import torch

from slimflow.checkpoint import CheckpointError, check_config, load_state_checked, read_model_file
from teachers.unet import PRESETS, build_unet


def resolve_model_config(spec: dict) -> dict:
    """`{preset: name, key: value...}` -> the full UNet config (preset values overridden by the given keys)."""
    spec = dict(spec)
    name = spec.pop("preset", None)
    if name is None:
        return spec
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], **spec}


def build_model(spec: dict) -> torch.nn.Module:
    return build_unet(resolve_model_config(spec))


def load_model(path: str | Path, expect: dict | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A network from an exported `.safetensors` (+ `.json`) or a training run/checkpoint directory (EMA weights).

    `expect`, when given, is the architecture config the caller requires; any difference is an error.
    """
    sidecar, weights = read_model_file(path)
    config = sidecar.get("model")
    if not config:
        raise CheckpointError(f"{str(path)!r} does not record its model config")
    if expect is not None:
        check_config(resolve_model_config(expect), config, str(path))
    model = build_from_sidecar(sidecar)
    load_state_checked(model, weights, str(path))
    return model.to(device).eval().requires_grad_(False)


def build_from_sidecar(sidecar: dict) -> torch.nn.Module:
    """The (untrained) network a model file's sidecar describes: its UNet config, with the channels of its
    `pruning` record removed when the model was pruned (see pruning.flow)."""
    model = build_unet(sidecar["model"])
    if sidecar.get("pruning"):
        from pruning.flow import apply_pruning_record

        apply_pruning_record(model, sidecar["pruning"])
    return model
