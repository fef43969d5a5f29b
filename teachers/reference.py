"""Load reference-format (score_sde / RectifiedFlow / SlimFlow NCSN++) checkpoints into `teachers.unet.UNet`.

A reference checkpoint is a dict `{'model': state_dict, 'ema': {'shadow_params': [...], ...}, 'optimizer': ...,
'step': ...}` written by torch.save, whose state dict keys are `all_modules.<i>.<...>` (with a `module.` prefix
when the net was wrapped in DataParallel) plus an unused `sigmas` buffer. A bare state dict is accepted too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slimflow.checkpoint import load_torch_file

# Buffers the reference registers that the UNet does not use (the SMLD noise levels of NCSNpp).
UNUSED_REFERENCE_BUFFERS = ("sigmas",)

_DATAPARALLEL_PREFIX = "module."
_SHOWN_KEYS = 8

# Reference `config.model` options the UNet implements, with the one value it implements.
_REQUIRED_VALUES: dict[str, Any] = {
    "name": "ncsnpp",
    "resblock_type": "biggan",
    "embedding_type": "positional",
    "conditional": True,
    "fir": False,
    "skip_rescale": True,
    "progressive": "none",
    "progressive_input": "none",
    "nonlinearity": "swish",
    "scale_by_sigma": False,
}
# Options the reference NCSNpp does not read; checked only when a config carries them.
_VALUES_IF_PRESENT: dict[str, Any] = {"normalization": "groupnorm", "attention_type": "ddpm", "conv_size": 3}
# Options with no effect on this network: training/SDE settings, or settings used only by branches excluded
# above (FIR kernel, Fourier scale, progressive combine, Up/Downsample convs unused by BigGAN blocks) and
# init_scale (initialisation only; checkpoint weights replace it).
_IGNORED = frozenset(
    {
        "sigma_min", "sigma_max", "num_scales", "beta_min", "beta_max", "ema_rate", "fir_kernel",
        "fourier_scale", "progressive_combine", "resamp_with_conv", "init_scale",
    }
)  # fmt: skip
_MAPPED = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")


def reference_config_to_unet_config(
    model_config: Mapping[str, Any], *, image_size: int, num_channels: int
) -> dict[str, Any]:
    """Map a reference `config.model` dict (+ `config.data.image_size`, `num_channels`) to `build_unet` kwargs.

    Raises ValueError on options the UNet does not implement (e.g. fir=True, progressive != 'none') and on
    keys it does not know.
    """
    config = dict(model_config.items())
    problems = [f"missing option {key!r}" for key in (*_MAPPED, *_REQUIRED_VALUES) if key not in config]
    checks = {**_REQUIRED_VALUES, **{k: v for k, v in _VALUES_IF_PRESENT.items() if k in config}}
    for key, implemented in checks.items():
        if key in config and _normalise(config[key]) != implemented:
            problems.append(f"{key}={config[key]!r} (the UNet implements only {key}={implemented!r})")
    known = {*_MAPPED, *_REQUIRED_VALUES, *_VALUES_IF_PRESENT, *_IGNORED}
    problems += [f"unknown option {key!r}" for key in sorted(set(config) - known)]
    if problems:
        raise ValueError("reference model config not supported by teachers.unet.UNet: " + "; ".join(problems))
    return {
        "in_channels": int(num_channels),
        "resolution": int(image_size),
        "nf": int(config["nf"]),
        "ch_mult": [int(m) for m in config["ch_mult"]],
        "num_res_blocks": int(config["num_res_blocks"]),
        "attn_resolutions": [int(r) for r in config["attn_resolutions"]],
        "dropout": float(config["dropout"]),
        "time_scale": 999.0,
    }


def _normalise(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def load_reference_state_dict(
    obj_or_path: Mapping[str, Any] | str | Path,
    model: nn.Module,
    *,
    weights: Literal["auto", "ema", "model"] = "auto",
    unsafe_pickle: bool = False,
) -> str:
    """Load a reference checkpoint (object or file) into `model` strictly; returns which weights were used.

    `weights` picks the entry of a wrapped checkpoint: "auto" takes 'ema' when present (the reference
    samples and evaluates with EMA weights), else 'model'. A file is read by `slimflow.checkpoint.load_torch_file`
    (weights only); pass unsafe_pickle=True only for a file you trust (unpickling can run arbitrary code).
    """
    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}")
    if isinstance(obj_or_path, (str, Path)):
        checkpoint = load_torch_file(obj_or_path, unsafe_pickle)
        where = str(obj_or_path)
    else:
        checkpoint, where = obj_or_path, "the given checkpoint object"
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{where} is a {type(checkpoint).__name__}, not a checkpoint dict or state dict")

    source, state_dict = _select_weights(checkpoint, model, weights, where)
    state_dict = _strip_prefix(state_dict)
    for key in UNUSED_REFERENCE_BUFFERS:
        state_dict.pop(key, None)
    _check_matches(state_dict, model, where, source)
    model.load_state_dict(state_dict, strict=True)
    return source


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(key, str) and key.removeprefix(_DATAPARALLEL_PREFIX).startswith("all_modules.") for key in obj
    )


def _select_weights(
    checkpoint: Mapping[str, Any], model: nn.Module, weights: str, where: str
) -> tuple[str, dict[str, Any]]:
    if _is_state_dict(checkpoint):
        if weights != "auto":
            raise ValueError(
                f"weights={weights!r} asks for the {weights!r} entry, but {where} is a bare state dict "
                "(all_modules.* keys at top level); use weights='auto'"
            )
        return "state_dict", dict(checkpoint)
    present = [key for key in ("ema", "model") if key in checkpoint]
    if not present:
        raise ValueError(
            f"{where} is not a reference checkpoint: top-level keys {sorted(map(str, checkpoint))[:_SHOWN_KEYS]}; "
            "expected all_modules.* keys or a dict with 'model' and/or 'ema'"
        )
    source = present[0] if weights == "auto" else weights
    if source not in checkpoint:
        raise ValueError(f"{where} has no {source!r} entry (it has {present}); choose weights={present[0]!r}")
    entry = checkpoint[source]
    if _is_state_dict(entry):
        return source, dict(entry)
    if isinstance(entry, Mapping) and "shadow_params" in entry:
        return source, _shadow_params_to_state_dict(entry["shadow_params"], model, where)
    raise ValueError(
        f"the {source!r} entry of {where} is neither a state dict with all_modules.* keys nor an EMA state "
        f"with 'shadow_params' (got {type(entry).__name__})"
    )


def _shadow_params_to_state_dict(shadow_params: Any, model: nn.Module, where: str) -> dict[str, Any]:
    """Reference EMA keeps a list of tensors in `model.parameters()` order; name them after `model`."""
    named = list(model.named_parameters())
    if not isinstance(shadow_params, (list, tuple)) or len(shadow_params) != len(named):
        count = len(shadow_params) if isinstance(shadow_params, (list, tuple)) else type(shadow_params).__name__
        raise ValueError(
            f"EMA 'shadow_params' of {where} has {count} entries but the model has {len(named)} parameters; "
            "the checkpoint was made for a different architecture"
        )
    return {name: tensor for (name, _), tensor in zip(named, shadow_params)}


def _strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    if state_dict and all(key.startswith(_DATAPARALLEL_PREFIX) for key in state_dict):
        return {key.removeprefix(_DATAPARALLEL_PREFIX): value for key, value in state_dict.items()}
    return state_dict


def _shown(keys: list[str]) -> str:
    more = f" … and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def _check_matches(state_dict: dict[str, Any], model: nn.Module, where: str, source: str) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    not_tensors = [key for key in state_dict if key in expected and not isinstance(state_dict[key], torch.Tensor)]
    mis_shaped = [
        f"{key} {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if isinstance(state_dict.get(key), torch.Tensor) and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or not_tensors or mis_shaped:
        parts = [
            f"{label} ({len(keys)}): {_shown(keys)}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("values that are not tensors", not_tensors),
                ("mis-shaped", mis_shaped),
            )
            if keys
        ]
        raise ValueError(
            f"the {source!r} weights of {where} do not fit the model: " + "; ".join(parts) + ". Build the "
            "model from the checkpoint's own config with reference_config_to_unet_config(config.model, "
            "image_size=..., num_channels=...)."
        )
