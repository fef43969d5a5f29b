"""Edge export of a one-step generator: noise z ↦ image x̂ = z + v_θ(z, t0), batch size dynamic, with t0 the
time the model file records (`one_step_time`: the t0 a student was distilled at; 0 for other models; see
slimflow.sample and docs/methods.md, "One-step generator").

Writes to `out_dir`:
- `generator.pt2`: a `torch.export` program (load with `torch.export.load(path).module()`),
- `generator.onnx`: ONNX from the torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`, the
  default since torch 2.9; the TorchScript exporter is deprecated). The program is decomposed to core ATen
  first: onnxscript's translation of `scaled_dot_product_attention` accepts only 4-D inputs and the UNet's
  attention is 3-D, so it is exported as matmul/softmax.
- `export.json`: what was written, the parity checks and the latencies.

Checks: the reloaded .pt2 program and onnxruntime (CPU provider) must reproduce PyTorch's output on the same
noise within `atol`, else ExportMismatchError. Latency: median ms per image at batch 1 for PyTorch eager and
onnxruntime, both with torch's current thread count. Export runs on CPU (the files carry no device).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from pruning.measure import count_params, median_ms
from slimflow.checkpoint import atomic_write_text, require_writable
from slimflow.flow import noise_for
from slimflow.sample import one_step_images, one_step_time
from teachers.zoo import load_model

FORMATS = ("onnx", "torch_export")
TRACE_BATCH = 2  # a batch of 1 would let torch.export specialise the batch dimension to 1
CHECK_BATCH = 4
MAX_BATCH = 4096
ONNX_EXTRA = "pip install 'slimflow[onnx]' (onnx, onnxscript, onnxruntime)"


class ExportMismatchError(RuntimeError):
    """An exported program's output differs from PyTorch's beyond the tolerance."""


class OneStepGenerator(nn.Module):
    """z (B, C, H, W) ↦ z + v(z, t0), the one-step generator of `velocity` (t0: its `one_step_time`)."""

    def __init__(self, velocity: nn.Module):
        super().__init__()
        self.velocity = velocity
        self.t0 = one_step_time(velocity)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return one_step_images(self.velocity, z, self.t0)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _check(name: str, diff: float, atol: float) -> None:
    if not diff <= atol:
        raise ExportMismatchError(
            f"{name} output differs from PyTorch's by {diff:.3g} (max abs) on the same noise, "
            f"above the tolerance {atol:g}"
        )


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"checking the ONNX export needs onnxruntime ({err}); {ONNX_EXTRA}") from None
    return onnxruntime


def _export_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    try:
        onnx_program = torch.onnx.export(program.run_decompositions(), dynamo=True, verbose=False)
    except ImportError as err:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({err}); {ONNX_EXTRA}") from None
    onnx_program.save(str(path))


def _check_onnx(path: Path, z: torch.Tensor, expected: torch.Tensor, atol: float, warmup: int, repeats: int) -> dict:
    """onnxruntime vs PyTorch on the same noise, and onnxruntime's batch-1 latency."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = torch.from_numpy(session.run(None, {name: z.numpy()})[0])
    diff = _max_abs_diff(got, expected)
    _check("onnxruntime", diff, atol)
    one = z[:1].numpy()
    latency = median_ms(lambda: session.run(None, {name: one}), torch.device("cpu"), warmup, repeats)
    return {"max_abs_diff": diff, "onnxruntime": ort.__version__, "latency_ms_b1": latency}


@torch.no_grad()
def export_model(
    model_path: str | Path | nn.Module,
    out_dir: str | Path,
    formats: tuple[str, ...] = FORMATS,
    *,
    seed: int = 0,
    atol: float = 1e-4,
    warmup: int = 5,
    repeats: int = 50,
    resolution: int | None = None,
    unsafe_pickle: bool = False,
) -> dict:
    """Export the one-step generator of a velocity model file (any format `teachers.zoo.load_model` reads; a
    reference DDPM++ checkpoint needs `resolution`); returns (and writes as export.json) a report: files, params,
    max abs differences to PyTorch on the noise of (seed, 0..3), and batch-1 latencies."""
    bad = sorted(set(formats) - set(FORMATS))
    if bad or not formats:
        raise ValueError(f"unknown export formats {bad or formats}; choose from {FORMATS}")
    out = require_writable(out_dir)
    if isinstance(model_path, nn.Module):  # a module in memory: a CPU copy (the caller's module is left as it is)
        velocity = copy.deepcopy(model_path).cpu().eval()
        if getattr(velocity, "sample_shape", None) is None:
            raise ValueError("the module has no sample_shape (C, H, W); set it, or export its model file")
    else:
        velocity = load_model(model_path, device="cpu", resolution=resolution, unsafe_pickle=unsafe_pickle)
    generator = OneStepGenerator(velocity).eval()
    shape = tuple(velocity.sample_shape)
    z = noise_for(list(range(CHECK_BATCH)), seed, shape)
    expected = generator(z)
    one = z[:1]
    report: dict = {
        "model": type(model_path).__name__ if isinstance(model_path, nn.Module) else str(model_path),
        "params": count_params(velocity),
        "input": ["batch", *shape],
        "mapping": f"image = z + v(z, {generator.t0:g}), z ~ N(0, I); output not clamped (nominally [-1, 1])",
        "one_step_time": generator.t0,
        "atol": atol,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "torch_latency_ms_b1": median_ms(lambda: generator(one), one.device, warmup, repeats),
    }
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(generator, (z[:TRACE_BATCH],), dynamic_shapes=({0: batch},))
    if "torch_export" in formats:
        path = out / "generator.pt2"
        torch.export.save(program, str(path))
        diff = _max_abs_diff(torch.export.load(str(path)).module()(z), expected)
        _check("torch.export program", diff, atol)
        report["torch_export"] = {"file": str(path), "max_abs_diff": diff}
    if "onnx" in formats:
        path = out / "generator.onnx"
        _export_onnx(program, path)
        report["onnx"] = {"file": str(path), **_check_onnx(path, z, expected, atol, warmup, repeats)}
    atomic_write_text(out / "export.json", json.dumps(report, indent=1) + "\n")
    return report
