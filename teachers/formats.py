"""Checkpoint formats on disk: recognise what a file or folder holds (used by `teachers.zoo.load_model`).

Formats, recognised by content rather than by file name:
- "slimflow-checkpoint": a training checkpoint directory (`meta.json` next to `model.safetensors` /
  `ema.safetensors`), a run directory whose `latest` names one, or one of those files given directly.
- "slimflow-model": an exported `<name>.safetensors` with its `<name>.json` sidecar.
- "diffusers": a `UNet2DModel` folder (`config.json` with `_class_name`) or a pipeline folder with `unet/`.
- "reference-ddpmpp": a score_sde / RectifiedFlow / SlimFlow `.pth` whose state dict has `all_modules.*` keys,
  bare or under 'model' / 'ema', with or without DataParallel's 'module.' prefix (loaded by teachers.reference).
- "edm-pickle": an EDM / SiD / GDD `.pkl` network saved by `torch_utils.persistence`, read by
  `teachers.edm_pickle` without running the code it carries (rebuilt by `teachers.edm`).
- "state-dict": any other name → tensor mapping (torch file or bare safetensors): no architecture recorded.

Torch files are read by `slimflow.checkpoint.load_torch_file` (weights only; a file that pickles Python objects is
refused unless the caller passes `unsafe_pickle=True`, CLI `--unsafe-pickle`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from slimflow.checkpoint import CheckpointError, file_kind, load_torch_file
from teachers.adapters import read_json
from teachers.edm_pickle import is_edm_pickle, read_edm_pickle
from teachers.reference import load_reference_state_dict
from teachers.unet import build_unet

PROJECT_CONVENTION = "t=0 noise, t=1 data (project convention); network predicts the velocity x - z"
REFERENCE_CONVENTION = (
    "RectifiedFlow/SlimFlow: velocity, t=0 noise, t=1 data, network called on 999*t; a score_sde checkpoint "
    "with this layout is a VP/VE score model instead - the weights do not say which"
)
REFERENCE_WRAPPERS = ("ema", "model")  # where reference checkpoints keep their state dict (as teachers.reference)
STATE_WRAPPERS = ("state_dict", "model", "ema")  # where other checkpoints commonly keep theirs


def detect_format(path: str | Path, unsafe_pickle: bool = False) -> str:
    """The format name of the checkpoint at `path` (see the module docstring); raises naming the cause."""
    return detect(Path(path), unsafe_pickle)[0]


def detect(path: Path, unsafe_pickle: bool) -> tuple[str, Any]:
    """(format, the loaded object of a torch file or None)."""
    if not path.exists():
        raise FileNotFoundError(f"no model file or checkpoint at {str(path)!r}")
    if path.is_dir():
        if any((path / name).is_file() for name in ("meta.json", "latest", "checkpoints/latest")):
            return "slimflow-checkpoint", None
        for config in (path / "config.json", path / "unet" / "config.json"):
            if config.is_file() and "_class_name" in read_json(config):
                return "diffusers", None
        raise CheckpointError(
            f"unknown checkpoint format: directory {str(path)!r} has no meta.json or latest (slimflow checkpoint), "
            "nor a config.json or unet/config.json with a _class_name (diffusers)"
        )
    if path.suffix == ".safetensors" and (path.parent / "meta.json").is_file():
        return "slimflow-checkpoint", None
    if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        return "slimflow-model", None
    if file_kind(path) == "safetensors":
        return ("slimflow-model" if path.with_suffix(".json").is_file() else "state-dict"), None
    if is_edm_pickle(path):  # before torch.load, which would refuse it (or, with unsafe_pickle, run its code)
        return "edm-pickle", read_edm_pickle(path)
    obj = load_torch_file(path, unsafe_pickle)
    return ("reference-ddpmpp" if reference_state(obj)[0] is not None else "state-dict"), obj


def _tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return obj
    return None


def _candidates(obj: Any, wrappers: tuple[str, ...]) -> list[tuple[Any, str]]:
    return [(obj, "top level")] + [(obj.get(w), f"'{w}'") for w in wrappers if isinstance(obj, dict)]


def reference_state(obj: Any) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(reference state dict with 'module.' stripped, where it was found) or (None, '')."""
    for candidate, where in _candidates(obj, REFERENCE_WRAPPERS):
        state = _tensor_dict(candidate)
        if state is not None and any("all_modules." in k for k in state):
            return {k.removeprefix("module."): v for k, v in state.items()}, where
    return None, ""


def plain_state(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    for candidate, where in _candidates(obj, STATE_WRAPPERS):
        state = _tensor_dict(candidate)
        if state is not None:
            return state, where
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"unknown checkpoint format: no name -> tensor mapping at the top level or under "
        f"{', '.join(map(repr, STATE_WRAPPERS))} (found {keys})"
    )


def ddpmpp_config_guess(shapes: dict[str, tuple[int, ...]]) -> dict:
    """nf, ch_mult, num_res_blocks, attention levels and channels of a reference DDPM++ state dict's shapes.

    Reads the module sequence of the reference NCSNpp (DDPM++: BigGAN res-blocks, no progressive paths): the
    decoder's last level ends in num_res_blocks + 1 skip-concatenating blocks (more input than output channels,
    after an up-sampling block that keeps its width), a model with L levels has
    L·(2·num_res_blocks + 3) res-blocks, and level i's first block outputs nf·ch_mult[i] channels.
    """
    modules: dict[int, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for key, shape in shapes.items():
        if key.startswith("all_modules."):
            index, _, rest = key[len("all_modules.") :].partition(".")
            modules[int(index)][rest] = tuple(shape)
    try:
        if sorted(modules) != list(range(len(modules))):
            raise ValueError
        seq = [modules[i] for i in range(len(modules))]
        nf, in_channels = seq[0]["weight"][1], seq[2]["weight"][1]
        body = seq[3:-2]
        blocks = [m for m in body if "NIN_0.W" not in m]
        last_level = 0
        while last_level < len(blocks) and _widens(blocks[-1 - last_level]):
            last_level += 1
        num_res_blocks = last_level - 1
        levels, rest = divmod(len(blocks), 2 * num_res_blocks + 3)
        if num_res_blocks < 1 or rest:
            raise ValueError
        ch_mult, attn_levels, i = [], [], 0
        for level in range(levels):
            ch_mult.append(body[i]["Conv_0.weight"][0] // nf)
            for _ in range(num_res_blocks):
                i += 1
                if "NIN_0.W" in body[i]:
                    i += 1
                    if level not in attn_levels:
                        attn_levels.append(level)
            i += level != levels - 1
    except (KeyError, IndexError, ValueError):
        raise CheckpointError(
            "the all_modules.* tensors do not follow the reference DDPM++ layout "
            "(BigGAN res-blocks, no progressive paths); cannot tell its architecture"
        ) from None
    return {
        "nf": nf,
        "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "attn_levels": attn_levels,
        "in_channels": in_channels,
    }


def _widens(block: dict[str, tuple[int, ...]]) -> bool:
    out_ch, in_ch = block["Conv_0.weight"][:2]
    return in_ch != out_ch


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is corrupt or truncated ({err})") from None


def reference_unet_config(guess: dict, resolution: int) -> dict:
    """`teachers.unet` config of a guessed reference architecture at an image resolution (dropout 0: inference)."""
    return {
        "in_channels": guess["in_channels"],
        "resolution": resolution,
        "nf": guess["nf"],
        "ch_mult": guess["ch_mult"],
        "num_res_blocks": guess["num_res_blocks"],
        "attn_resolutions": [resolution // 2**level for level in guess["attn_levels"]],
        "dropout": 0.0,
    }


def load_reference(obj: Any, resolution: int | None, path: Path) -> tuple[torch.nn.Module, str, dict]:
    """(UNet holding the checkpoint's weights, which weights: 'ema', 'model' or 'state_dict', the guessed config).

    Without a resolution the UNet is built at a nominal one (the weights do not depend on it).
    """
    guess = ddpmpp_config_guess({k: tuple(v.shape) for k, v in reference_state(obj)[0].items()})
    nominal = 2 ** max(5, len(guess["ch_mult"]) - 1)
    model = build_unet(reference_unet_config(guess, nominal if resolution is None else resolution))
    try:
        source = load_reference_state_dict(obj, model)
    except ValueError as err:
        raise CheckpointError(f"{str(path)!r}: {err}") from None
    return model.eval().requires_grad_(False), source, guess


def slimflow_model_path(path: Path) -> Path:
    """What `teachers.zoo.load_model` takes: a run/checkpoint directory or an exported .safetensors file."""
    if path.is_file() and (path.parent / "meta.json").is_file():
        return path.parent
    return path
