"""Dynamic dead-neuron rate (DNR; docs/methods.md, "Pruning"): the share of activation outputs that are dead, per layer and overall,
counted by forward hooks on the activation modules over every forward pass while attached.

ReLU: a unit is dead when its output is exactly 0. SiLU / GELU: when its pre-activation (the module's input) is
≤ `threshold` (0 by default). Functional activations (F.relu inside forward) have no module and are not seen.
"""

from __future__ import annotations

import torch
from torch import nn


class DeadNeuronMonitor:
    """Counts dead units of every ReLU/SiLU/GELU module of `model`; use as a context manager or call close()."""

    def __init__(self, model: nn.Module, *, threshold: float = 0.0):
        self.threshold = threshold
        self.dead: dict[str, torch.Tensor] = {}
        self.seen: dict[str, int] = {}
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, nn.ReLU):
                self.handles.append(m.register_forward_hook(self._relu_hook(name)))
            elif isinstance(m, (nn.SiLU, nn.GELU)):  # before the module runs: SiLU may work in place
                self.handles.append(m.register_forward_pre_hook(self._pre_activation_hook(name)))
        if not self.handles:
            raise ValueError("the model has no ReLU/SiLU/GELU modules to measure the dead-neuron rate on")

    def _add(self, name: str, dead: torch.Tensor, numel: int) -> None:
        self.dead[name] = self.dead.get(name, 0) + dead.detach()
        self.seen[name] = self.seen.get(name, 0) + numel

    def _relu_hook(self, name: str):
        def count(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self._add(name, (output == 0).sum(), output.numel())

        return count

    def _pre_activation_hook(self, name: str):
        def count(_module: nn.Module, inputs: tuple) -> None:
            self._add(name, (inputs[0] <= self.threshold).sum(), inputs[0].numel())

        return count

    def rates(self) -> dict:
        """{"overall": dead / all units seen, "layers": {module name: rate}} since the last reset."""
        if not self.seen:
            raise ValueError("no forward pass was seen since the monitor was attached or reset")
        dead = {name: int(count) for name, count in self.dead.items()}
        return {
            "overall": sum(dead.values()) / sum(self.seen.values()),
            "layers": {name: dead[name] / self.seen[name] for name in self.seen},
        }

    def reset(self) -> None:
        self.dead.clear()
        self.seen.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> DeadNeuronMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_dnr(writer, rates: dict, step: int, tag: str = "dnr") -> None:
    """Write `rates` (from DeadNeuronMonitor.rates) to a TensorBoard SummaryWriter as scalars."""
    writer.add_scalar(f"{tag}/overall", rates["overall"], step)
    for name, rate in rates["layers"].items():
        writer.add_scalar(f"{tag}/{name}", rate, step)
