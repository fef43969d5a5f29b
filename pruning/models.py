"""Networks to prune: a timm or torchvision model by name, or a user's own `nn.Module` class, optionally with
local pretrained weights or a user checkpoint. An architecture spec is a JSON-able dict {"source", "name",
"num_classes", "in_chans", "kwargs"} (plus "module" for a user class) that rebuilds the unpruned architecture
(randomly initialised) with `build_model`.

A user class is named `package.module:Class` (imported with the working directory on the path) or
`path/to/file.py:Class`, and built as `Class(**kwargs)`: its constructor gets only the given keyword arguments.
Building it runs the user's code, so `build_model` does it only with `import_code=True` (a pruned-model directory
from someone else names code to import, which is as unsafe as unpickling it).

Nothing is downloaded. Pretrained weights are looked up in the local caches (torch hub, Hugging Face) or taken
from a given file; when absent, a FileNotFoundError names the file and where it was looked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

SOURCES = ("timm", "torchvision", "python")
MODEL_FORMS = "'timm:<name>', 'torchvision:<name>', 'package.module:Class' or 'path/to/file.py:Class'"
RESERVED_KWARGS = ("num_classes", "in_chans", "pretrained", "weights")  # set by the spec, not by kwargs


def model_spec(model: str, *, num_classes: int, in_chans: int, kwargs: Mapping | None = None) -> dict:
    """Spec from "timm:<name>", "torchvision:<name>" (3 input channels), "package.module:Class" or
    "file.py:Class"; `kwargs` go to the model's constructor (e.g. {"img_size": 32, "patch_size": 4} for a ViT)."""
    kwargs = dict(kwargs or {})
    source, sep, name = model.partition(":")
    if not sep or not source or not name:
        raise ValueError(f"model must be {MODEL_FORMS}, got {model!r}")
    if source in ("timm", "torchvision"):
        reserved = sorted(set(kwargs) & set(RESERVED_KWARGS))
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)} cannot be a model argument: the number of classes and input channels come "
                f"from the data (or --num-classes), the weights from --checkpoint / --pretrained"
            )
        if source == "torchvision" and in_chans != 3:
            raise ValueError(
                f"torchvision models take 3 input channels, got in_chans={in_chans} "
                f"(grey images are repeated to 3 channels by the data pipeline)"
            )
        return {
            "source": source,
            "name": name,
            "num_classes": int(num_classes),
            "in_chans": int(in_chans),
            "kwargs": kwargs,
        }
    module, _, name = model.rpartition(":")
    if not name.isidentifier():
        raise ValueError(f"model must be {MODEL_FORMS}; {name!r} is not a class name")
    if module.endswith(".py"):
        module = str(Path(module).resolve())
    return {
        "source": "python",
        "module": module,
        "name": name,
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "kwargs": kwargs,
    }


def _import_module(module: str):
    """The module of a user class: a .py file, or a dotted name importable from the working directory."""
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise FileNotFoundError(f"model file {module!r} does not exist")
        name = f"slimflow_user_model.{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded  # dataclasses and pickling look the class's module up by name
        spec.loader.exec_module(loaded)
        return loaded
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ValueError(
            f"cannot import {module!r} ({err}); give a dotted module importable from here or a .py path"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)


def _construct(kind: str, make, kwargs: Mapping) -> nn.Module:
    try:
        return make()
    except TypeError as err:
        raise ValueError(f"{kind} does not take the model arguments {dict(kwargs)}: {err}") from None


def build_model(spec: Mapping, *, import_code: bool = False) -> nn.Module:
    """The unpruned architecture of `spec`, randomly initialised. A user class ("python" source) is imported and
    built only with `import_code=True`: that runs its code."""
    kwargs = dict(spec.get("kwargs") or {})
    if spec["source"] == "timm":
        if not timm.is_model(spec["name"]):
            raise ValueError(f"timm has no model {spec['name']!r} (see timm.list_models())")
        return _construct(
            f"timm:{spec['name']}",
            lambda: timm.create_model(
                spec["name"], pretrained=False, num_classes=spec["num_classes"], in_chans=spec["in_chans"], **kwargs
            ),
            kwargs,
        )
    if spec["source"] == "torchvision":
        if spec["name"] not in torchvision.models.list_models():
            raise ValueError(f"torchvision has no model {spec['name']!r} (see torchvision.models.list_models())")
        return _construct(
            f"torchvision:{spec['name']}",
            lambda: torchvision.models.get_model(spec["name"], weights=None, num_classes=spec["num_classes"], **kwargs),
            kwargs,
        )
    if spec["source"] == "python":
        where = f"{spec['module']}:{spec['name']}"
        if not import_code:
            raise ValueError(
                f"this architecture is the user class {where}; building it imports and runs that code. Pass "
                f"import_code=True (CLI: --trust-code) if you trust it"
            )
        cls = getattr(_import_module(spec["module"]), spec["name"], None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"{where} is not an nn.Module class")
        return _construct(where, lambda: cls(**kwargs), kwargs)
    raise ValueError(f"unknown model source {spec['source']!r}: use one of {', '.join(SOURCES)}")


def describe(spec: Mapping) -> str:
    """ "timm:vit_tiny_patch16_224", "mynets.py:Net": how the user named the architecture."""
    return f"{spec.get('module', spec['source'])}:{spec['name']}"


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


def create_model(
    spec: Mapping, *, pretrained: bool | str = False, checkpoint: str | None = None, import_code: bool = False
) -> nn.Module:
    """`build_model(spec)` with weights: a user `checkpoint` (state dict, strict), or `pretrained` weights
    (True: look in the local caches; a path: that file). Without either, random initialisation."""
    if pretrained and checkpoint:
        raise ValueError("give either pretrained or checkpoint, not both")
    if checkpoint:
        model = build_model(spec, import_code=import_code)
        try:
            model.load_state_dict(read_state_dict(checkpoint))
        except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
            raise ValueError(
                f"{checkpoint} does not fit {describe(spec)} with {spec['num_classes']} classes and "
                f"{spec['in_chans']} input channels: {' '.join(str(err).split())[:400]}"
            ) from None
        return model
    if not pretrained:
        return build_model(spec, import_code=import_code)
    if spec["source"] == "python":
        raise ValueError(f"{describe(spec)} has no pretrained weights to look up: give its weights as checkpoint")
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
            **dict(spec.get("kwargs") or {}),
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
