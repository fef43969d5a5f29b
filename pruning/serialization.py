"""Save / load pruned models without unpickling code.

A pruned-model directory holds
- `model.safetensors`: the pruned state dict;
- `pruning.json`: the architecture spec of the *unpruned* network, the shapes/dtypes of the example inputs,
  Torch-Pruning's pruning history (module name, out/in channels, removed indices per pruned group), the channel
  dimension of each unwrapped parameter, and the modules' width attributes (head counts, `embed_dim`, ...);
- `masks.safetensors` (unstructured pruning only).
Loading rebuilds the unpruned architecture, traces it on zero inputs, replays the history (channels are removed
exactly as before), sets the recorded width attributes and loads the state dict strictly: the loaded model computes
bit-identical outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from safetensors.torch import load_model, save_model
from torch import nn

from .measure import as_args
from .models import build_model
from .structured import (
    find_unwrapped_parameters,
    set_width_attributes,
    sync_attention_dims,
    torch_pruning_unwrapped,
    width_attributes,
)
from .unstructured import WeightMasks

FORMAT = "slimflow-pruned-model/1"


def save_pruned(
    out_dir: str | Path,
    model: nn.Module,
    *,
    arch: Mapping,
    example_inputs: Any,
    history: list | None = None,
    masks: WeightMasks | None = None,
    unwrapped_parameters: Mapping[str, int] | None = None,
    extra: Mapping | None = None,
) -> Path:
    """Write model.safetensors + pruning.json (+ masks.safetensors) to `out_dir`; returns the directory.

    arch: JSON-able spec that `build` (see load_pruned) turns into the unpruned network; history: the
    StructuredPruner/prune_structured history (empty for unstructured pruning); unwrapped_parameters: the
    {name: dim} the model was pruned with (prune_structured's report), when given; extra: JSON-able provenance.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "arch": dict(arch),
        "example_inputs": input_specs(example_inputs),
        "history": history or [],
        "unwrapped_parameters": dict(unwrapped_parameters or {}),
        "width_attributes": width_attributes(model),
        "masks": masks is not None,
        "extra": dict(extra or {}),
    }
    tmp = out_dir / f".model.safetensors.tmp-{os.getpid()}"
    save_model(model, str(tmp))
    os.replace(tmp, out_dir / "model.safetensors")
    if masks is not None:
        masks.save(out_dir / "masks.safetensors")
    tmp = out_dir / f".pruning.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / "pruning.json")
    return out_dir


def read_meta(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "pruning.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a pruned-model directory written by save_pruned")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def input_specs(example_inputs: Any) -> list[dict]:
    """JSON-able shapes and dtypes of example inputs (what `replay_history` traces with)."""
    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in as_args(example_inputs)]


def replay_history(
    model: nn.Module,
    history: list,
    input_specs: list[dict],
    *,
    custom_pruners: dict | None = None,
    unwrapped_parameters: Mapping[str, int] | None = None,
    attributes: Mapping[str, Mapping[str, int]] | None = None,
) -> nn.Module:
    """Remove the channels recorded in `history` from the unpruned `model` (in place), exactly as before: trace it
    on zero inputs of `input_specs` and replay Torch-Pruning's history, then set the recorded width `attributes`
    (without them, attention's `head_dim` is recomputed from its unchanged head count, as files written before
    attributes were recorded expect). An empty history changes no channels."""
    if history:
        inputs = tuple(torch.zeros(x["shape"], dtype=getattr(torch, x["dtype"])) for x in input_specs)
        was_training = model.training
        dims = find_unwrapped_parameters(model, custom_pruners=custom_pruners, dims=dict(unwrapped_parameters or {}))
        with torch.enable_grad():  # Torch-Pruning traces through autograd
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=inputs,
                customized_pruners=custom_pruners,
                unwrapped_parameters=torch_pruning_unwrapped(model, dims),
            )
            graph.load_pruning_history(history)
        model.train(was_training)  # tracing left it in eval()
    if attributes is not None:
        set_width_attributes(model, dict(attributes))
    elif history:
        sync_attention_dims(model)
    return model


def load_pruned(
    out_dir: str | Path,
    build: Callable[[Mapping], nn.Module] | None = None,
    *,
    custom_pruners: dict | None = None,
    import_code: bool = False,
) -> nn.Module:
    """Rebuild the unpruned network with `build(arch)` (default: `build_model`), replay the pruning history, load
    the weights (CPU).

    custom_pruners: the same mapping the model was pruned with (see StructuredPruner). import_code: allow
    `build_model` to import the user class the directory names (that runs its code; trust the directory first).
    """
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    model = build(meta["arch"]) if build is not None else build_model(meta["arch"], import_code=import_code)
    replay_history(
        model,
        meta["history"],
        meta["example_inputs"],
        custom_pruners=custom_pruners,
        unwrapped_parameters=meta.get("unwrapped_parameters"),
        attributes=meta.get("width_attributes"),
    )
    try:
        load_model(model, str(out_dir / "model.safetensors"), strict=True)
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"{out_dir / 'model.safetensors'} does not fit the architecture rebuilt from "
            f"{out_dir / 'pruning.json'}: {err}"
        ) from err
    return model


def load_masks(out_dir: str | Path) -> WeightMasks:
    """The masks saved next to an unstructured-pruned model."""
    return WeightMasks.load(Path(out_dir) / "masks.safetensors")
