"""Cost of a network: parameters and MACs (Torch-Pruning's counter) and measured latency."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch_pruning as tp
from torch import nn


def as_args(example_inputs: Any) -> tuple:
    """The positional arguments a forward pass takes: a tensor becomes a 1-tuple, a list a tuple."""
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(MACs, params) for one forward pass on `example_inputs` (use batch size 1 for per-sample MACs).

    Functional matmuls / scaled-dot-product attention are not counted by Torch-Pruning's counter.
    """
    macs, params = tp.utils.count_ops_and_params(model, as_args(example_inputs))
    return int(macs), int(params)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs: Any, *, warmup: int = 5, repeats: int = 20) -> float:
    """Median wall time in milliseconds of one eval-mode forward pass on `example_inputs` (their batch size)."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    args = as_args(example_inputs)
    device = args[0].device
    was_training = model.training
    model.eval()
    for _ in range(warmup):
        model(*args)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        model(*args)
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    model.train(was_training)
    return statistics.median(times)
