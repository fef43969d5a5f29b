"""Channel-pruned UNets: what Torch-Pruning needs to know about `teachers.unet`, and how a pruned model file's
record is replayed onto the unpruned architecture (so every stage loads pruned students like any other)."""

from __future__ import annotations

import torch
from torch import nn

from pruning.serialization import replay_history
from pruning.structured import MatmulPruner
from teachers.unet import NIN


def unet_custom_pruners() -> dict:
    """How Torch-Pruning prunes the layers of teachers.unet it does not know: NIN is x @ W + b."""
    return {NIN: MatmulPruner("W", "b")}


def unet_ignored_layers(model_config: dict) -> list[str]:
    """Layers of a `teachers.unet` model that keep their width: a class-conditional model's label embedding, whose
    output is added to the fixed-width sinusoidal time embedding."""
    return ["map_label"] if model_config.get("num_classes") else []


def example_inputs(model_config: dict, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """(x, t) zeros for tracing a UNet of `model_config`, and labels (class 0) for a class-conditional one, so that
    its label embedding is traced and pruned with the time embedding it is added to."""
    c, r = model_config["in_channels"], model_config["resolution"]
    x, t = torch.zeros(batch, c, r, r), torch.zeros(batch)
    return (x, t, torch.zeros(batch, dtype=torch.long)) if model_config.get("num_classes") else (x, t)


def apply_pruning_record(model: nn.Module, record: dict) -> nn.Module:
    """Remove the channels a pruned model file's `pruning` record lists from the unpruned UNet `model`."""
    return replay_history(
        model,
        record["history"],
        record["example_inputs"],
        custom_pruners=unet_custom_pruners(),
        unwrapped_parameters=record.get("unwrapped_parameters"),
        attributes=record.get("width_attributes"),  # GroupNorm group counts after whole-group pruning
    )
