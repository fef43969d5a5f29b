"""Cost of a generator: parameters, MACs, NFE per sample, latency and peak memory of sampling.

- MACs are Torch-Pruning's count (`torch_pruning.utils.count_ops_and_params`) of ONE network evaluation
  v(x, t) on one image: multiply-accumulates of Conv/Linear modules plus one op per element for their biases,
  norms, ReLU and pooling modules. Functional calls, bare tensor maths and modules outside the counter's list are
  not counted (in the project's UNet: the attention matmuls of `F.scaled_dot_product_attention`, the NIN
  projections, the `nn.SiLU` modules, resampling). For the Fashion-MNIST UNet presets the two effects nearly cancel: the count is within 2% of the
  conv/matmul MACs torch's FlopCounterMode sees. MACs per sample = MACs × NFE.
- Latency: median wall time of repeated generations of a batch (after warm-up), divided by the batch size, in
  ms/image; on CUDA each run is synchronised. It times the whole sampler (every NFE) on the model's device.
- Peak memory: the extra memory one generation of a batch needs beyond what was held before it (so the model's
  weights are not counted), in MiB. CUDA: `torch.cuda.max_memory_allocated` minus the allocated bytes before
  the run. CPU: the peak of live tensor bytes allocated through torch's CPU allocator during the run, from the
  torch profiler's memory events (`profile_memory=True`) summed in time order. Like the CUDA figure it counts
  tensors only (not allocator caching or library workspaces); unlike it, a temporary allocated and freed inside
  a single operator is netted out, so it is a slight underestimate. (The process RSS was tried and rejected:
  glibc keeps freed memory resident, so a repeated run shows almost no RSS growth.)
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

from pruning.measure import count_macs_params, count_params, median_ms
from slimflow.flow import balanced_labels
from slimflow.sample import conditioned, num_classes
from slimflow.solvers import solve

MIB = 2**20


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _labels(model: torch.nn.Module, batch_size: int) -> torch.Tensor | None:
    """Class-balanced labels for a class-conditional model (None for an unconditional one)."""
    classes = num_classes(model)
    return balanced_labels(batch_size, classes).to(_device(model)) if classes else None


def _velocity_inputs(model: torch.nn.Module, shape: tuple[int, ...], batch_size: int) -> tuple[torch.Tensor, ...]:
    device = _device(model)
    labels = _labels(model, batch_size)
    inputs = (torch.randn(batch_size, *shape, device=device), torch.full((batch_size,), 0.5, device=device))
    return inputs if labels is None else (*inputs, labels)


@torch.no_grad()
def count_macs(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Torch-Pruning's MAC count of one call model(x, t) on one image of `shape` (C, H, W)."""
    return count_macs_params(model, _velocity_inputs(model, shape, 1))[0]


def generator_fn(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    batch_size: int,
    method: str = "euler",
    steps: int | None = 1,
    tol: float = 1e-5,
) -> tuple[Callable[[], torch.Tensor], int]:
    """(a function generating one batch from fixed noise with the solver, NFE per sample of that solver)."""
    z = torch.randn(batch_size, *shape, device=_device(model))
    velocity = conditioned(model, _labels(model, batch_size))  # a conditional model under class-balanced labels

    @torch.no_grad()
    def run() -> torch.Tensor:
        return solve(velocity, z, method=method, steps=steps, rtol=tol, atol=tol).x

    with torch.no_grad():
        nfe = solve(velocity, z, method=method, steps=steps, rtol=tol, atol=tol).nfe
    return run, nfe


@contextlib.contextmanager
def _silence_c_output() -> Iterator[None]:
    """Discard what C++ code writes to fds 1 and 2 (Kineto prints start/stop and GPU-probe lines per session)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def _cpu_peak_tensor_bytes(run: Callable[[], object]) -> int:
    with _silence_c_output():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage  # + allocations, − frees, attributed to the innermost operator
        peak = max(peak, live)
    return peak


def peak_memory_mib(run: Callable[[], object], device: torch.device) -> float:
    """Extra memory (MiB) one call of `run()` needs on `device` (see the module docstring for what it measures)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    return _cpu_peak_tensor_bytes(run) / MIB


def measure_cost(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    method: str = "euler",
    steps: int | None = 1,
    tol: float = 1e-5,
    batch_sizes: tuple[int, ...] = (1, 64),
    warmup: int = 2,
    repeats: int = 10,
) -> dict:
    """params, MACs per NFE and per sample, NFE per sample, latency (ms/image) at each batch size, and the peak
    memory of one generation at the largest batch size, for sampling `model` with the given solver."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}")
    was_training = model.training
    model.eval()
    device = _device(model)
    out: dict = {"params": count_params(model), "macs_per_nfe": count_macs(model, shape)}
    for batch_size in sorted(batch_sizes):
        run, nfe = generator_fn(model, shape, batch_size, method, steps, tol)
        out[f"latency_ms_b{batch_size}"] = median_ms(run, device, warmup, repeats) / batch_size
    out["nfe"] = nfe  # dopri5: NFE of the largest batch (the per-sample tolerance makes it batch dependent)
    out["macs_per_sample"] = out["macs_per_nfe"] * nfe
    out[f"peak_mem_mib_b{max(batch_sizes)}"] = peak_memory_mib(run, device)
    model.train(was_training)
    return out
