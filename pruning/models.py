"""Networks to prune: a timm or torchvision model by name, optionally with local pretrained weights or a user
checkpoint. An architecture spec is a JSON-able dict {"source", "name", "num_classes", "in_chans"} that rebuilds
the unpruned architecture (randomly initialised) with `build_model`.

Nothing is downloaded. Pretrained weights are looked up in the local caches (torch hub, Hugging Face) or taken
from a given file; when absent, a FileNotFoundError names the file and where it was looked for.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

SOURCES = ("timm", "torchvision")


def model_spec(model: str, *, num_classes: int, in_chans: int) -> dict:
    """Spec from "timm:<name>" or "torchvision:<name>" (torchvision networks take 3 input channels)."""
    source, sep, name = model.partition(":")
    if not sep or source not in SOURCES or not name:
        raise ValueError(f"model must be 'timm:<name>' or 'torchvision:<name>', got {model!r}")
    if source == "torchvision" and in_chans != 3:
        raise ValueError(
            f"torchvision models take 3 input channels, got in_chans={in_chans} "
            f"(grey images are repeated to 3 channels by the data pipeline)"
        )
    return {"source": source, "name": name, "num_classes": int(num_classes), "in_chans": int(in_chans)}


def build_model(spec: Mapping) -> nn.Module:
    """The unpruned architecture of `spec`, randomly initialised."""
    if spec["source"] == "timm":
        if not timm.is_model(spec["name"]):
            raise ValueError(f"timm has no model {spec['name']!r} (see timm.list_models())")
        return timm.create_model(
            spec["name"], pretrained=False, num_classes=spec["num_classes"], in_chans=spec["in_chans"]
        )
    if spec["source"] == "torchvision":
        if spec["name"] not in torchvision.models.list_models():
            raise ValueError(f"torchvision has no model {spec['name']!r} (see torchvision.models.list_models())")
        return torchvision.models.get_model(spec["name"], weights=None, num_classes=spec["num_classes"])
    raise ValueError(f"unknown model source {spec['source']!r}: use one of {', '.join(SOURCES)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch file loaded with weights_only=True (no code is unpickled);
    a {"state_dict"/"model": ...} wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load and safetensors raise many types for files they cannot read
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        if "Unsupported global" in str(err) or "Weights only load failed" in str(err):
            raise ValueError(
                f"{path} pickles Python objects, which are not loaded (unpickling can run code from the file); "
                "save the weights as a plain state dict or .safetensors"
            ) from None
        raise ValueError(f"{path} is not a readable weights file ({type(err).__name__}: {first})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _local_pretrained(spec: Mapping) -> list[Path]:
    """Where the pretrained file of `spec` would be in the local caches."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if spec["source"] == "torchvision":
        url = torchvision.models.get_model_weights(spec["name"]).DEFAULT.url
        return [hub / url.rsplit("/", 1)[-1]]
    cfg = timm.models.get_pretrained_cfg(spec["name"])
    if cfg is None:
        raise ValueError(f"timm knows no pretrained weights for {spec['name']!r}")
    places = [hub / cfg.url.rsplit("/", 1)[-1]] if cfg.url else []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            places.append(
                Path(found) if isinstance(found, str) else Path(f"<huggingface cache>/{cfg.hf_hub_id}/{filename}")
            )
    return places


def create_model(spec: Mapping, *, pretrained: bool | str = False, checkpoint: str | None = None) -> nn.Module:
    """`build_model(spec)` with weights: a user `checkpoint` (state dict, strict), or `pretrained` weights
    (True: look in the local caches; a path: that file). Without either, random initialisation."""
    if pretrained and checkpoint:
        raise ValueError("give either pretrained or checkpoint, not both")
    if checkpoint:
        model = build_model(spec)
        try:
            model.load_state_dict(read_state_dict(checkpoint))
        except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
            raise ValueError(
                f"{checkpoint} does not fit {spec['source']}:{spec['name']} with {spec['num_classes']} classes and "
                f"{spec['in_chans']} input channels: {' '.join(str(err).split())[:400]}"
            ) from None
        return model
    if not pretrained:
        return build_model(spec)
    places = [Path(pretrained)] if isinstance(pretrained, str) else _local_pretrained(spec)
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"pretrained weights for {spec['source']}:{spec['name']} are not on this machine and cannot be "
            f"downloaded here; looked for {', '.join(map(str, places))}. Copy the file there, pass its path as "
            f"pretrained, or train the network yourself and pass it as checkpoint"
        )
    read_state_dict(found)  # a file that cannot be read safely stops here, before timm reads it
    if spec["source"] == "timm":  # timm adapts the stem to in_chans and drops a head of another class count
        return timm.create_model(
            spec["name"],
            pretrained=True,
            pretrained_cfg_overlay={"file": str(found)},
            num_classes=spec["num_classes"],
            in_chans=spec["in_chans"],
        )
    model = build_model(spec)
    own = model.state_dict()
    state = read_state_dict(found)
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if skipped:
        warnings.warn(
            f"pretrained tensors with other shapes keep their random init: {', '.join(skipped)}", stacklevel=2
        )
    result = model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    if set(result.missing_keys) != set(skipped) or result.unexpected_keys:
        raise ValueError(
            f"{found} does not fit {spec['name']}: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    return model
