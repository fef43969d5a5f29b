"""Cost of a network: parameters and MACs (Torch-Pruning's counter) and measured wall time.

The project's one home for these measurements; `slimflow.cost` builds the cost of a whole generator (every NFE of
a sampler, peak memory) on top of them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn


def as_args(example_inputs: Any) -> tuple:
    """The positional arguments a forward pass takes: a tensor becomes a 1-tuple, a list a tuple."""
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(MACs, params) for one forward pass on `example_inputs` (use batch size 1 for per-sample MACs).

    Functional matmuls / scaled-dot-product attention are not counted by Torch-Pruning's counter.
    """
    macs, params = tp.utils.count_ops_and_params(model, as_args(example_inputs))
    return int(macs), int(params)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall time of `run()` in ms over `repeats` calls after `warmup` calls (synchronised on CUDA)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        run()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs: Any, *, warmup: int = 5, repeats: int = 20) -> float:
    """Median wall time in milliseconds of one eval-mode forward pass on `example_inputs` (their batch size)."""
    args = as_args(example_inputs)
    was_training = model.training
    model.eval()
    try:
        return median_ms(lambda: model(*args), args[0].device, warmup, repeats)
    finally:
        model.train(was_training)
