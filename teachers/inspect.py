"""What is this checkpoint? Recognise a teacher on disk, describe it (`slimflow teacher info`), load it as v(x, t).

Formats, recognised by content rather than by file name:
- "slimflow-checkpoint": a training checkpoint directory (`meta.json` next to `model.safetensors` /
  `ema.safetensors`), a run directory whose `latest` names one, or one of those files given directly.
- "slimflow-model": an exported `<name>.safetensors` with its `<name>.json` sidecar.
- "diffusers": a `UNet2DModel` folder (`config.json` with `_class_name`) or a pipeline folder with `unet/`.
- "reference-ddpmpp": a score_sde / RectifiedFlow / SlimFlow `.pth` whose state dict has `all_modules.*` keys,
  bare or under 'model' / 'ema', with or without DataParallel's 'module.' prefix (loaded by teachers.reference).
- "state-dict": any other name → tensor mapping (torch file or bare safetensors): no architecture recorded.

Torch files are read with `torch.load(weights_only=True)`; a file that pickles Python objects is refused with a
message, unless the caller passes `unsafe_pickle=True` (CLI `--unsafe-pickle`) for a file it trusts.
"""
from __future__ import annotations

import json
import math
import re
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from slimflow.checkpoint import CheckpointError, latest_checkpoint, read_meta
from teachers.adapters import diffusers_layout, diffusers_schedule, load_diffusers_teacher, read_json

PROJECT_CONVENTION = "t=0 noise, t=1 data (project convention); network predicts the velocity x - z"
REFERENCE_CONVENTION = (
    "RectifiedFlow/SlimFlow: velocity, t=0 noise, t=1 data, network called on 999*t; a score_sde checkpoint "
    "with this layout is a VP/VE score model instead - the weights do not say which"
)
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80
REFERENCE_WRAPPERS = ("ema", "model")  # where reference checkpoints keep their state dict (as teachers.reference)
STATE_WRAPPERS = ("state_dict", "model", "ema")  # where other checkpoints commonly keep theirs


def detect_format(path: str | Path, unsafe_pickle: bool = False) -> str:
    """The format name of the checkpoint at `path` (see the module docstring); raises naming the cause."""
    return _detect(Path(path), unsafe_pickle)[0]


def _detect(path: Path, unsafe_pickle: bool) -> tuple[str, Any]:
    """(format, the loaded object of a torch file or None)."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if path.is_dir():
        if (path / "meta.json").is_file() or (path / "latest").is_file():
            return "slimflow-checkpoint", None
        for config in (path / "config.json", path / "unet" / "config.json"):
            if config.is_file() and "_class_name" in read_json(config):
                return "diffusers", None
        raise CheckpointError(
            f"unknown checkpoint format: directory {str(path)!r} has no meta.json or latest (slimflow checkpoint), "
            "nor a config.json or unet/config.json with a _class_name (diffusers)")
    if path.suffix == ".safetensors" and (path.parent / "meta.json").is_file():
        return "slimflow-checkpoint", None
    if _file_kind(path) == "safetensors":
        return ("slimflow-model" if path.with_suffix(".json").is_file() else "state-dict"), None
    obj = load_torch_file(path, unsafe_pickle)
    return ("reference-ddpmpp" if _reference_state(obj)[0] is not None else "state-dict"), obj


def _file_kind(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == ZIP_MAGIC or head[:1] == bytes([PICKLE_PROTO]):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"
    raise CheckpointError(f"unknown checkpoint format: {str(path)!r} is neither a PyTorch file (zip or pickle) "
                          f"nor safetensors (it starts with {head[:8]!r})")


def load_torch_file(path: str | Path, unsafe_pickle: bool = False) -> Any:
    """`torch.load` on the CPU with weights_only=True; a file that pickles code needs `unsafe_pickle=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    _file_kind(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if needs is None:
            raise CheckpointError(f"{str(path)!r} is corrupt or truncated: torch.load failed "
                                  f"({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})") from None
        if not unsafe_pickle:
            raise CheckpointError(
                f"{str(path)!r} pickles Python objects ({needs.group(1)}), and unpickling it could run arbitrary "
                "code, so it was not loaded. If you trust the file, pass unsafe_pickle=True (CLI: --unsafe-pickle)"
            ) from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return obj
    return None


def _candidates(obj: Any, wrappers: tuple[str, ...]) -> list[tuple[Any, str]]:
    return [(obj, "top level")] + [(obj.get(w), f"'{w}'") for w in wrappers if isinstance(obj, dict)]


def _reference_state(obj: Any) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(reference state dict with 'module.' stripped, where it was found) or (None, '')."""
    for candidate, where in _candidates(obj, REFERENCE_WRAPPERS):
        state = _tensor_dict(candidate)
        if state is not None and any("all_modules." in k for k in state):
            return {k.removeprefix("module."): v for k, v in state.items()}, where
    return None, ""


def _plain_state(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    for candidate, where in _candidates(obj, STATE_WRAPPERS):
        state = _tensor_dict(candidate)
        if state is not None:
            return state, where
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"unknown checkpoint format: no name -> tensor mapping at the top level or under "
                          f"{', '.join(map(repr, STATE_WRAPPERS))} (found {keys})")


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
            index, _, rest = key[len("all_modules."):].partition(".")
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
        raise CheckpointError("the all_modules.* tensors do not follow the reference DDPM++ layout "
                              "(BigGAN res-blocks, no progressive paths); cannot tell its architecture") from None
    return {"nf": nf, "ch_mult": ch_mult, "num_res_blocks": num_res_blocks, "attn_levels": attn_levels,
            "in_channels": in_channels}


def _widens(block: dict[str, tuple[int, ...]]) -> bool:
    out_ch, in_ch = block["Conv_0.weight"][:2]
    return in_ch != out_ch


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is corrupt or truncated ({err})") from None


def _count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def describe_checkpoint(path: str | Path, unsafe_pickle: bool = False) -> dict:
    """Format, architecture, parameter count, time convention and prediction of the checkpoint at `path`.

    Keys: path, format, architecture (dict), params, tensors, prediction, time_convention, notes (list of str).
    """
    path = Path(path)
    fmt, obj = _detect(path, unsafe_pickle)
    if fmt in ("slimflow-checkpoint", "slimflow-model"):
        info = _describe_slimflow(path, fmt)
    elif fmt == "diffusers":
        info = _describe_diffusers(path)
    elif fmt == "reference-ddpmpp":
        info = _describe_reference(path, obj)
    else:
        info = _describe_state_dict(path, obj)
    return {"path": str(path), "format": fmt, **info}


def _describe_slimflow(path: Path, fmt: str) -> dict:
    from teachers.zoo import load_model

    model = load_model(_slimflow_model_path(path))  # verifies checksums, config and every tensor's shape
    if fmt == "slimflow-checkpoint":
        ckpt = _slimflow_model_path(path)
        meta = read_meta(latest_checkpoint(ckpt) or ckpt)
        weights = "EMA" if "ema.safetensors" in meta["sha256"] else "raw"
        convention, note = PROJECT_CONVENTION, f"step {meta['step']}, {weights} weights described"
    else:
        sidecar = read_json(path.with_suffix(".json"))
        convention = sidecar.get("time_convention", PROJECT_CONVENTION)
        note = f"kind: {sidecar.get('kind', 'not recorded')}"
    return {"architecture": dict(model.config), "params": sum(p.numel() for p in model.parameters()),
            "tensors": len(model.state_dict()), "prediction": "velocity", "time_convention": convention,
            "notes": [note]}


def _describe_reference(path: Path, obj: Any) -> dict:
    model, source, guess = _load_reference(obj, None, path)
    notes = [f"state dict found at {_reference_state(obj)[1]}; its '{source}' weights load into teachers.unet.UNet",
             "resolution is not stored in the weights: attention at level i acts at resolution/2^i"]
    if isinstance(obj.get("ema"), dict) and "shadow_params" in obj["ema"]:
        notes.append(f"score_sde EMA: {len(obj['ema']['shadow_params'])} shadow parameters, "
                     f"decay {obj['ema'].get('decay')}")
    if "step" in obj:
        notes.append(f"step {int(obj['step'])}")
    return {"architecture": guess, "params": sum(p.numel() for p in model.parameters()),
            "tensors": len(model.state_dict()), "prediction": "velocity (RectifiedFlow/SlimFlow) or score (score_sde)",
            "time_convention": REFERENCE_CONVENTION, "notes": notes}


def _describe_state_dict(path: Path, obj: Any) -> dict:
    if obj is None:
        shapes, where = _safetensors_shapes(path), "safetensors file without a sidecar"
    else:
        state, where = _plain_state(obj)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    return {"architecture": {"first_tensors": {k: list(s) for k, s in list(shapes.items())[:5]}},
            "params": _count(shapes), "tensors": len(shapes), "prediction": "unknown",
            "time_convention": "unknown: a plain state dict records no architecture or time convention",
            "notes": [f"state dict found at {where}"]}


def reference_unet_config(guess: dict, resolution: int) -> dict:
    """`teachers.unet` config of a guessed reference architecture at an image resolution (dropout 0: inference)."""
    return {"in_channels": guess["in_channels"], "resolution": resolution, "nf": guess["nf"],
            "ch_mult": guess["ch_mult"], "num_res_blocks": guess["num_res_blocks"],
            "attn_resolutions": [resolution // 2**level for level in guess["attn_levels"]], "dropout": 0.0}


def _load_reference(obj: Any, resolution: int | None, path: Path) -> tuple[torch.nn.Module, str, dict]:
    """(UNet holding the checkpoint's weights, which weights: 'ema', 'model' or 'state_dict', the guessed config).

    Without a resolution the UNet is built at a nominal one (the weights do not depend on it).
    """
    from teachers.reference import load_reference_state_dict
    from teachers.unet import build_unet

    guess = ddpmpp_config_guess({k: tuple(v.shape) for k, v in _reference_state(obj)[0].items()})
    nominal = 2 ** max(5, len(guess["ch_mult"]) - 1)
    model = build_unet(reference_unet_config(guess, nominal if resolution is None else resolution))
    try:
        source = load_reference_state_dict(obj, model)
    except ValueError as err:
        raise CheckpointError(f"{str(path)!r}: {err}") from None
    return model.eval().requires_grad_(False), source, guess


def _slimflow_model_path(path: Path) -> Path:
    """What `teachers.zoo.load_model` takes: a run/checkpoint directory or an exported .safetensors file."""
    if path.is_file() and (path.parent / "meta.json").is_file():
        return path.parent
    return path


def _describe_diffusers(folder: Path) -> dict:
    unet_dir, scheduler = diffusers_layout(folder)
    config = read_json(unet_dir / "config.json")
    files = sorted(unet_dir.glob("diffusion_pytorch_model*.safetensors")) or \
        sorted(unet_dir.glob("diffusion_pytorch_model*.bin"))
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(_safetensors_shapes(file) if file.suffix == ".safetensors" else
                      {k: tuple(v.shape) for k, v in _plain_state(load_torch_file(file))[0].items()})
    if not shapes:
        raise CheckpointError(f"diffusers folder {str(unet_dir)!r} has no diffusion_pytorch_model weights "
                              "(.safetensors or .bin)")
    schedule, prediction = diffusers_schedule(read_json(scheduler) if scheduler else {})
    keys = ("_class_name", "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
            "down_block_types", "up_block_types", "time_embedding_type")
    return {
        "architecture": {k: config.get(k) for k in keys if k in config},
        "params": _count(shapes), "tensors": len(shapes), "prediction": prediction,
        "time_convention": (f"diffusion timestep k (0 = clean, {schedule.name}); adapted to project time "
                            f"t in [{schedule.t_min:.4f}, {schedule.t_max:.4f}] by teachers.adapters"),
        "notes": [f"scheduler: {scheduler}" if scheduler else "no scheduler_config.json: DDPM defaults assumed"],
    }


def format_summary(info: dict) -> str:
    """Human-readable lines of `describe_checkpoint`'s result."""
    lines = [f"path:            {info['path']}", f"format:          {info['format']}",
             f"parameters:      {info['params']:,} ({info['params'] / 1e6:.3f}M) in {info['tensors']} tensors",
             f"prediction:      {info['prediction']}", f"time convention: {info['time_convention']}",
             "architecture:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in info["architecture"].items()]
    lines += [f"note: {n}" for n in info["notes"]]
    return "\n".join(lines)


def load_teacher(path: str | Path, unsafe_pickle: bool = False, resolution: int | None = None) -> torch.nn.Module:
    """The checkpoint at `path` as a velocity field `v(x, t)` in the project convention, on the CPU, in eval mode.

    The returned module has `sample_shape` (C, H, W) when the format records it. A reference DDPM++ checkpoint
    does not record its image resolution: pass `resolution` (32 for the CIFAR-10 models); it is loaded as the
    RectifiedFlow/SlimFlow velocity network it is (EMA weights when present).
    """
    path = Path(path)
    fmt, obj = _detect(path, unsafe_pickle)
    if fmt == "reference-ddpmpp":
        if resolution is None:
            raise ValueError(f"{str(path)!r} is a reference DDPM++ checkpoint, which does not record its image "
                             "resolution: pass resolution= (32 for the CIFAR-10 models)")
        model = _load_reference(obj, resolution, path)[0]
    elif fmt in ("slimflow-checkpoint", "slimflow-model"):
        from teachers.zoo import load_model

        model = load_model(_slimflow_model_path(path))
    elif fmt == "diffusers":
        return load_diffusers_teacher(path)
    else:
        raise CheckpointError(f"{str(path)!r} is a plain state dict: it does not record its architecture, so it "
                              "cannot be loaded as a teacher; export it with its config "
                              "(slimflow.checkpoint.save_model)")
    model.sample_shape = (model.config["in_channels"], model.config["resolution"], model.config["resolution"])
    return model
