"""What is this checkpoint? Describe a model file of any format `teachers.zoo.load_model` reads (`slimflow teacher
info`): its format, architecture, parameter count, prediction and time convention.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from slimflow.checkpoint import CheckpointError, latest_checkpoint, load_torch_file, read_meta
from teachers.adapters import diffusers_layout, diffusers_schedule, read_json
from teachers.edm import describe_edm
from teachers.formats import (
    PROJECT_CONVENTION,
    REFERENCE_CONVENTION,
    detect,
    load_reference,
    plain_state,
    reference_state,
    safetensors_shapes,
    slimflow_model_path,
)
from teachers.zoo import load_model


def _count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def describe_checkpoint(path: str | Path, unsafe_pickle: bool = False) -> dict:
    """Format, architecture, parameter count, time convention and prediction of the checkpoint at `path`.

    Keys: path, format, architecture (dict), params, tensors, prediction, time_convention, notes (list of str).
    """
    path = Path(path)
    fmt, obj = detect(path, unsafe_pickle)
    if fmt in ("slimflow-checkpoint", "slimflow-model"):
        info = _describe_slimflow(path, fmt)
    elif fmt == "diffusers":
        info = _describe_diffusers(path)
    elif fmt == "reference-ddpmpp":
        info = _describe_reference(path, obj)
    elif fmt == "edm-pickle":
        info = describe_edm(obj, path)
    else:
        info = _describe_state_dict(path, obj)
    return {"path": str(path), "format": fmt, **info}


def _describe_slimflow(path: Path, fmt: str) -> dict:
    model = load_model(slimflow_model_path(path))  # verifies checksums, config and every tensor's shape
    if fmt == "slimflow-checkpoint":
        ckpt = slimflow_model_path(path)
        meta = read_meta(latest_checkpoint(ckpt) or ckpt)
        weights = "EMA" if "ema.safetensors" in meta["sha256"] else "raw"
        convention, note = PROJECT_CONVENTION, f"step {meta['step']}, {weights} weights described"
    else:
        sidecar = read_json(path.with_suffix(".json"))
        convention = sidecar.get("time_convention", PROJECT_CONVENTION)
        note = f"kind: {sidecar.get('kind', 'not recorded')}"
    return {
        "architecture": dict(model.config),
        "params": sum(p.numel() for p in model.parameters()),
        "tensors": len(model.state_dict()),
        "prediction": "velocity",
        "time_convention": convention,
        "notes": [note],
    }


def _describe_reference(path: Path, obj: Any) -> dict:
    model, source, guess = load_reference(obj, None, path)
    notes = [
        f"state dict found at {reference_state(obj)[1]}; its '{source}' weights load into teachers.unet.UNet",
        "resolution is not stored in the weights: attention at level i acts at resolution/2^i",
    ]
    if isinstance(obj.get("ema"), dict) and "shadow_params" in obj["ema"]:
        notes.append(
            f"score_sde EMA: {len(obj['ema']['shadow_params'])} shadow parameters, decay {obj['ema'].get('decay')}"
        )
    if "step" in obj:
        notes.append(f"step {int(obj['step'])}")
    return {
        "architecture": guess,
        "params": sum(p.numel() for p in model.parameters()),
        "tensors": len(model.state_dict()),
        "prediction": "velocity (RectifiedFlow/SlimFlow) or score (score_sde)",
        "time_convention": REFERENCE_CONVENTION,
        "notes": notes,
    }


def _describe_state_dict(path: Path, obj: Any) -> dict:
    if obj is None:
        shapes, where = safetensors_shapes(path), "safetensors file without a sidecar"
    else:
        state, where = plain_state(obj)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    return {
        "architecture": {"first_tensors": {k: list(s) for k, s in list(shapes.items())[:5]}},
        "params": _count(shapes),
        "tensors": len(shapes),
        "prediction": "unknown",
        "time_convention": "unknown: a plain state dict records no architecture or time convention",
        "notes": [f"state dict found at {where}"],
    }


def _describe_diffusers(folder: Path) -> dict:
    unet_dir, scheduler = diffusers_layout(folder)
    config = read_json(unet_dir / "config.json")
    files = sorted(unet_dir.glob("diffusion_pytorch_model*.safetensors")) or sorted(
        unet_dir.glob("diffusion_pytorch_model*.bin")
    )
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(
            safetensors_shapes(file)
            if file.suffix == ".safetensors"
            else {k: tuple(v.shape) for k, v in plain_state(load_torch_file(file))[0].items()}
        )
    if not shapes:
        raise CheckpointError(
            f"diffusers folder {str(unet_dir)!r} has no diffusion_pytorch_model weights (.safetensors or .bin)"
        )
    schedule, prediction = diffusers_schedule(read_json(scheduler) if scheduler else {})
    keys = (
        "_class_name",
        "sample_size",
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "time_embedding_type",
    )
    return {
        "architecture": {k: config.get(k) for k in keys if k in config},
        "params": _count(shapes),
        "tensors": len(shapes),
        "prediction": prediction,
        "time_convention": (
            f"diffusion timestep k (0 = clean, {schedule.name}); adapted to project time "
            f"t in [{schedule.t_min:.4f}, {schedule.t_max:.4f}] by teachers.adapters"
        ),
        "notes": [f"scheduler: {scheduler}" if scheduler else "no scheduler_config.json: DDPM defaults assumed"],
    }


def format_summary(info: dict) -> str:
    """Human-readable lines of `describe_checkpoint`'s result."""
    lines = [
        f"path:            {info['path']}",
        f"format:          {info['format']}",
        f"parameters:      {info['params']:,} ({info['params'] / 1e6:.3f}M) in {info['tensors']} tensors",
        f"prediction:      {info['prediction']}",
        f"time convention: {info['time_convention']}",
        "architecture:",
    ]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in info["architecture"].items()]
    lines += [f"note: {n}" for n in info["notes"]]
    return "\n".join(lines)
