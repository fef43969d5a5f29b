"""Edge export of a one-step generator: noise z ↦ image x̂ = z + v_θ(z, t0), batch size dynamic, with t0 the
time the model file records (`one_step_time`: the t0 a student was distilled at; 0 for other models; see
slimflow.sample and docs/methods.md, "One-step generator").

Writes to `out_dir`:
- `generator.pt2`: a `torch.export` program (load with `torch.export.load(path).module()`),
- `generator.onnx`: ONNX from the torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`, the
  default since torch 2.9; the TorchScript exporter is deprecated), input `noise` (batch, C, H, W) → output
  `image`, the batch axis named "batch"; the file's metadata records `one_step_time`. The exporter is given the
  program as traced (it decomposes it once, to the ops ONNX implements) and a translation of
  `scaled_dot_product_attention` as MatMul/Softmax/MatMul for any rank (onnxscript's own accepts only 4-D inputs;
  the UNet's attention is 3-D). onnxscript's optimiser is replaced by its constant folding and dead-node removal
  alone: its pattern rewriter took most of an export's time and changes nothing for these models (same ops, size
  and onnxruntime latency); initializers are not de-duplicated, so each normalisation keeps its own (onnxruntime's
  quantizer cannot quantize a bias shared between nodes).
- `generator.int8.onnx` (with `int8=True`): static post-training quantization by onnxruntime
  (`quantize_static`, QDQ format, weights int8 per channel — in 7 bits by default, `int8_reduce_range`, as
  onnxruntime's x86 kernels without VNNI need —, activations uint8 — the choice for x86 CPUs —, MinMax ranges)
  calibrated on the generator's own inputs: the noise of (`calibration_seed`, 0..`calibration`−1), with the
  class-balanced labels of those indices (i mod K) for a class-conditional generator. The same settings give the
  same file, byte for byte. Quantized: the op types `int8_ops` (default Conv and MatMul: every weight of the
  UNet's image path; normalisations, activations and the residual adds stay fp32) on the noise's path, minus the
  nodes `int8_exclude`; the time-embedding branch depends only on the batch size, not on the noise, and is always
  left in fp32, as is a conditional generator's label embedding (it depends on the labels alone).
- `generator.int8-mixed.onnx` (with `int8_budget` or `int8_fid_budget`): a sensitivity scan quantizes one block at
  a time, then the least sensitive blocks are quantized together as long as the error stays within the budget:
  the image RMSE to fp32 (`int8_budget`), or the FID against a reference set relative to the fp32 file's
  (`int8_fid_budget`: 0.05 allows +5 %); the others stay fp32 (`int8_mixed`).
- `export.json`: what was written, the parity checks, file sizes and latencies.

A class-conditional model (`num_classes` K > 0) is exported with a second input `label` (batch,) int64, classes in
[0, K) (NO_LABEL = -1: no label): (noise, label) → image; the ONNX metadata records `num_classes`, and the parity
checks use the class-balanced labels of the check noise (i mod K); so do the int8 calibration, the int8 files'
image errors and latencies, and the mixed-precision scan (its FID is on class-balanced samples, as in
`slimflow bench`).

Checks: the reloaded .pt2 program and onnxruntime (CPU provider) must reproduce PyTorch's output on the same
noise within `atol`, else ExportMismatchError. The int8 file is not held to a tolerance; its image error to the
fp32 ONNX file (max / mean absolute difference and RMSE, images nominally in [-1, 1]) on the noise of
(seed, 0..63) (and their class-balanced labels) is reported. Latency: median ms per image at batch 1 for PyTorch
eager and onnxruntime, both with torch's current thread count. Export runs on CPU (the files carry no device).
"""

from __future__ import annotations

import ast
import copy
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pruning.measure import count_params, median_ms
from slimflow.checkpoint import atomic_file, atomic_write_text, require_writable
from slimflow.data import to_uint8
from slimflow.flow import balanced_labels, noise_for
from slimflow.metrics import DEFAULT_CACHE_DIR, compute_metrics, metric_label, resolve_extractor
from slimflow.sample import num_classes, one_step_images, one_step_time, resolve_labels
from teachers.zoo import load_model

FORMATS = ("onnx", "torch_export")
TRACE_BATCH = 2  # a batch of 1 would let torch.export specialise the batch dimension to 1
CHECK_BATCH = 4
MAX_BATCH = 4096
INT8_CHECK = 64  # noise of (seed, 0..63): the int8 file's image error to fp32
INT8_OPS = ("Conv", "MatMul")
INT8_FID = {  # the FID that int8_fid_budget is measured by (see fid_of_file)
    "reference": {"name": "fashion_mnist", "split": "test"},  # image_size: the model's, unless given
    "n": 1000,
    "seed": 0,
    "extractor": "domain",
    "weights": None,
    "cache_dir": DEFAULT_CACHE_DIR,
}
INPUT, OUTPUT = "noise", "image"
LABEL = "label"  # the second input of a class-conditional generator
WEIGHT_TYPES = (1, 3, 10, 11)  # onnx.TensorProto FLOAT, INT8, FLOAT16, DOUBLE: initializers counted as parameters
ONNX_EXTRA = "pip install 'slimflow[onnx]' (onnx, onnxscript, onnxruntime)"


class ExportMismatchError(RuntimeError):
    """An exported program's output differs from PyTorch's beyond the tolerance."""


class OneStepGenerator(nn.Module):
    """z (B, C, H, W) ↦ z + v(z, t0), the one-step generator of `velocity` (t0: its `one_step_time`); a
    class-conditional one takes the labels (B,) too: (z, label) ↦ z + v(z, t0, label)."""

    def __init__(self, velocity: nn.Module):
        super().__init__()
        self.velocity = velocity
        self.t0 = one_step_time(velocity)
        self.num_classes = num_classes(velocity)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return one_step_images(self.velocity, z, self.t0, label)


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


def _quantization():
    """onnxruntime.quantization, or an ImportError saying what to install (checked before any work)."""
    try:
        from onnxruntime import quantization
    except ImportError as err:
        raise ImportError(f"int8 export needs onnxruntime's quantization tools ({err}); {ONNX_EXTRA}") from None
    return quantization


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """ONNX translation of aten.scaled_dot_product_attention (no mask, no dropout) for inputs of any rank:
    softmax(q kᵀ · scale) v, scale = 1/√d by default."""
    from onnxscript import opset18 as op

    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise NotImplementedError("the ONNX export translates attention without mask, causality, dropout or GQA")
    rank = len(query.shape)
    scores = op.MatMul(query, op.Transpose(key, perm=[*range(rank - 2), rank - 1, rank - 2]))
    if scale is None:
        scores = op.Div(scores, op.Sqrt(op.CastLike(op.Shape(query, start=-1), query)))
    else:
        scores = op.Mul(scores, op.CastLike(scale, query))
    return op.MatMul(op.Softmax(scores, axis=-1), value)


def _export_onnx(program: torch.export.ExportedProgram, path: Path, t0: float, classes: int = 0) -> None:
    try:
        import onnx_ir.passes.common as ir_passes
        import onnxscript.optimizer
    except ImportError as err:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({err}); {ONNX_EXTRA}") from None
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        verbose=False,
        input_names=[INPUT, LABEL] if classes else [INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: "batch"}, {0: "batch"}) if classes else ({0: "batch"},),
        custom_translation_table={torch.ops.aten.scaled_dot_product_attention.default: _attention},
        optimize=False,
    )
    model = onnx_program.model
    onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
    onnxscript.optimizer.remove_unused_nodes(model)
    ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    for node in model.graph.all_nodes():
        # nodes named by the module they come from (e.g. "all_modules.12.Conv_0/node_Conv_7"), so that int8_exclude
        # and the sensitivity scan can name layers and blocks; the exporter's other notes (stack traces, FX
        # nodes) are dropped: 40% of the file
        scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
        module = scopes[-2].removeprefix("velocity.") if len(scopes) > 2 else ""
        if module and module != "velocity":
            node.name = f"{module}/{node.name}"
        node.metadata_props.clear()
    model.metadata_props["one_step_time"] = repr(t0)
    if classes:
        model.metadata_props["num_classes"] = str(classes)
    with atomic_file(path) as tmp:
        onnx_program.save(str(tmp))


def _session(path: Path):
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(z: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """The inputs of a session: the noise, and the labels of a class-conditional generator."""
    return {INPUT: z.numpy(), **({} if labels is None else {LABEL: labels.to(torch.int64).numpy()})}


def _balanced(indices: int | list[int], classes: int) -> torch.Tensor | None:
    """The class-balanced labels (i mod K) of the samples `indices` (an int n: 0..n-1) of a generator of
    K = `classes` classes; None for an unconditional one (K = 0)."""
    return balanced_labels(indices, classes) if classes else None


def _classes(model) -> int:
    """The class count an ONNX model's metadata records (0: unconditional)."""
    return int({p.key: p.value for p in model.metadata_props}.get("num_classes", 0))


def _run(session, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    return torch.from_numpy(session.run(None, _feed(z, labels))[0])


def _latency(session, z: torch.Tensor, warmup: int, repeats: int, labels: torch.Tensor | None = None) -> float:
    one = _feed(z[:1], None if labels is None else labels[:1])
    return median_ms(lambda: session.run(None, one), torch.device("cpu"), warmup, repeats)


def _check_onnx(
    path: Path,
    z: torch.Tensor,
    expected: torch.Tensor,
    atol: float,
    warmup: int,
    repeats: int,
    labels: torch.Tensor | None = None,
) -> dict:
    """onnxruntime vs PyTorch on the same noise (and labels), and onnxruntime's batch-1 latency."""
    session = _session(path)
    diff = _max_abs_diff(_run(session, z, labels), expected)
    _check("onnxruntime", diff, atol)
    return {
        "max_abs_diff": diff,
        "bytes": path.stat().st_size,
        "onnxruntime": _onnxruntime().__version__,
        "latency_ms_b1": _latency(session, z, warmup, repeats, labels),
    }


def noise_path_excluded(model) -> list[str]:
    """Names of the nodes of an ONNX model that do not depend on the values of its input `noise` (only, through
    Shape, on its batch size): the one-step generator's time embedding of the constant t0 and, in a
    class-conditional generator, the label path (the label embedding, its sum with the time embedding and each
    block's projection of it), which depends on the `label` input alone. Quantization leaves them all in fp32;
    the nodes where the label path joins the noise's (the adds into the feature maps) depend on the noise."""
    dependent, excluded = {INPUT}, []
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        if node.op_type not in ("Shape", "Size") and dependent.intersection(node.input):
            dependent.update(node.output)
        else:
            excluded.append(node.name)
    return excluded


def check_int8_settings(calibration: int, calibration_batch: int, int8_ops) -> None:
    """Bad int8 settings or missing tools stop the export before any work."""
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise ValueError(f"int8 calibration needs at least one noise sample, got calibration={calibration!r}")
    if isinstance(calibration_batch, bool) or not isinstance(calibration_batch, int) or calibration_batch < 1:
        raise ValueError(f"calibration_batch must be a positive integer, got {calibration_batch!r}")
    if not int8_ops or isinstance(int8_ops, str):
        raise ValueError(
            f"int8_ops must be a non-empty list of ONNX op types (e.g. {list(INT8_OPS)}), got {int8_ops!r}"
        )
    _quantization()
    _onnxruntime()


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    shape: tuple[int, ...],
    calibration: int,
    calibration_seed: int,
    calibration_batch: int = 16,
    int8_ops: tuple[str, ...] = INT8_OPS,
    int8_exclude: tuple[str, ...] = (),
    reduce_range: bool = True,
) -> dict:
    """Static int8 quantization (QDQ) of an exported generator, calibrated on the noise of
    (calibration_seed, 0..calibration-1) and, for a class-conditional file (`num_classes` K in its metadata), the
    class-balanced labels of those indices (i mod K); returns the settings and the nodes left in fp32.
    `reduce_range`: 7-bit weights, which onnxruntime's uint8 x int8 kernels need on x86 CPUs without VNNI (AVX2:
    their 16-bit intermediate sums saturate with full-range weights; on this project's CPU that quadrupled the
    image error)."""
    import onnx

    q = _quantization()
    model = onnx.load(str(fp32_path))
    names = {node.name for node in model.graph.node}
    unknown = sorted(set(int8_exclude) - names)
    if unknown:
        raise ValueError(f"int8_exclude names nodes that are not in {fp32_path}: {unknown[:5]}")
    excluded = sorted(set(noise_path_excluded(model)) | set(int8_exclude))
    classes = _classes(model)
    inputs = [i.name for i in model.graph.input]
    if inputs != ([INPUT, LABEL] if classes else [INPUT]):
        raise ValueError(
            f"{str(fp32_path)!r} is not a generator exported by slimflow export: inputs {inputs} with "
            f"num_classes {classes} in its metadata (expected {INPUT!r}, and {LABEL!r} when num_classes > 0)"
        )

    class Noise(q.CalibrationDataReader):
        def __init__(self):
            starts = range(0, calibration, calibration_batch)
            self.batches = iter([list(range(s, min(calibration, s + calibration_batch))) for s in starts])

        def get_next(self):
            index = next(self.batches, None)
            if index is None:
                return None
            return _feed(noise_for(index, calibration_seed, shape), _balanced(index, classes))

    with atomic_file(out_path) as tmp:
        q.quantize_static(
            str(fp32_path),
            str(tmp),
            Noise(),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            op_types_to_quantize=list(int8_ops),
            nodes_to_exclude=excluded,
            calibrate_method=q.CalibrationMethod.MinMax,
        )
    return {
        "format": f"QDQ, weights int{7 if reduce_range else 8} per channel, activations uint8, MinMax calibration",
        "calibration": calibration,
        "calibration_seed": calibration_seed,
        "ops": list(int8_ops),
        "excluded": list(int8_exclude),
        "fp32_nodes": len(excluded),
    }


def image_error(got: torch.Tensor, reference: torch.Tensor) -> dict:
    """Max / mean absolute difference and RMSE of two image batches."""
    diff = got.double() - reference.double()
    return {
        "max_abs_diff": diff.abs().max().item(),
        "mean_abs_diff": diff.abs().mean().item(),
        "rmse": diff.pow(2).mean().sqrt().item(),
    }


def rmse_to_fp32(fp32_path: Path, check: torch.Tensor, labels: torch.Tensor | None = None) -> Callable[[Path], float]:
    """A quantized file's score: the RMSE of its images of the noise `check` (and `labels`, for a
    class-conditional file) to the fp32 file's."""
    reference = _run(_session(fp32_path), check, labels)
    return lambda path: image_error(_run(_session(path), check, labels), reference)["rmse"]


def fid_of_file(fid: dict) -> Callable[[Path], float]:
    """A file's score: its FID against a reference set, from the images of the noise of (seed, 0..n-1) (with
    class-balanced labels, i mod K, for a class-conditional file), as `slimflow bench` computes it. `fid`:
    {reference: a reference spec (see slimflow.metrics.reference_images), n, seed, extractor, weights,
    cache_dir}; the reference features are cached in cache_dir."""
    label = metric_label("fid", fid["extractor"])

    def score(path: Path) -> float:
        images = to_uint8(OnnxGenerator(path).sample(fid["n"], fid["seed"], 250))
        return compute_metrics(
            images,
            fid["reference"],
            fid["extractor"],
            metrics=("fid",),
            weights=fid["weights"],
            cache_dir=fid["cache_dir"],
            device="cpu",
            progress=False,
        )[label]

    return score


def check_fid_settings(fid: dict) -> dict:
    """The FID measure's settings with their defaults, checked before any work."""
    unknown = sorted(set(fid) - set(INT8_FID))
    if unknown:
        raise ValueError(f"unknown int8_fid keys {unknown}; it has {sorted(INT8_FID)}")
    fid = {**INT8_FID, **fid}
    if isinstance(fid["n"], bool) or not isinstance(fid["n"], int) or fid["n"] < 2:
        raise ValueError(f"int8_fid n (samples per FID) must be an integer >= 2, got {fid['n']!r}")
    if not isinstance(fid["reference"], dict) or "name" not in fid["reference"]:
        raise ValueError(f"int8_fid reference must be a spec with a name (e.g. {INT8_FID['reference']})")
    resolve_extractor(fid["extractor"], fid["weights"])  # missing weights stop before any export
    return fid


def block_of(node_name: str) -> str:
    """The block a node belongs to, from its module-path name: "all_modules.12.Conv_0/node_conv2d_18" ->
    "all_modules.12" (a ModuleList entry), "conv_out/x" -> "conv_out"; nodes outside any module -> "(top)"."""
    module, _, _ = node_name.rpartition("/")
    if not module:
        return "(top)"
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def int8_mixed(
    fp32_path: Path,
    out_path: Path,
    shape: tuple[int, ...],
    error: Callable[[Path], float],
    budget: float,
    calibration: int,
    calibration_seed: int,
    calibration_batch: int = 16,
    int8_ops: tuple[str, ...] = INT8_OPS,
    int8_exclude: tuple[str, ...] = (),
    reduce_range: bool = True,
) -> dict:
    """Sensitivity scan and a mixed-precision plan within an error budget.

    `error(path)` scores a quantized file (lower is better: the image RMSE to fp32 of `rmse_to_fp32`, or the FID
    of `fid_of_file`). Each block's quantizable nodes (op types `int8_ops` on the noise's path) are quantized
    alone and scored. Blocks are then quantized in order of increasing error: the plan is the longest prefix of
    that order whose file scores at most `budget`, found by bisection (which assumes the error grows with each
    block added); the rest stay fp32. Writes the plan's file to `out_path` (nothing when no block fits) and
    returns the scan and the plan."""
    import onnx

    if not budget > 0:
        raise ValueError(f"the int8 error budget must be positive, got {budget!r}")
    model = onnx.load(str(fp32_path))
    free = set(noise_path_excluded(model)) | set(int8_exclude)
    blocks: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in int8_ops and node.name not in free:
            blocks.setdefault(block_of(node.name), []).append(node.name)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".int8-scan-") as scratch:
        trials: dict[tuple[str, ...], float] = {}
        files: dict[tuple[str, ...], Path] = {}

        def quantized(chosen: tuple[str, ...]) -> float:
            if chosen in trials:
                return trials[chosen]
            keep = {name for block in chosen for name in blocks[block]}
            files[chosen] = path = Path(scratch) / f"{len(files)}.onnx"
            excluded = tuple(sorted({n for names in blocks.values() for n in names} - keep | set(int8_exclude)))
            quantize_int8(
                fp32_path,
                path,
                shape,
                calibration,
                calibration_seed,
                calibration_batch,
                int8_ops,
                excluded,
                reduce_range,
            )
            trials[chosen] = error(path)
            return trials[chosen]

        alone = {block: quantized((block,)) for block in blocks}
        order = sorted(blocks, key=lambda block: (alone[block], block))
        low, high = 0, len(order)  # the longest prefix within the budget: order[:low] fits, order[:high + 1] does not
        while low < high:
            mid = (low + high + 1) // 2
            if quantized(tuple(order[:mid])) <= budget:
                low = mid
            else:
                high = mid - 1
        plan = tuple(order[:low])
        if plan:  # every prefix the bisection accepted was quantized and measured
            files[plan].replace(out_path)
    return {
        "budget": budget,
        "scan": [{"block": b, "nodes": len(blocks[b]), "error_alone": alone[b]} for b in order],
        "int8_blocks": list(plan),
        "fp32_blocks": order[low:],
        "error": trials[plan] if plan else None,
        "quantizations": len(files),
        "file": str(out_path) if plan else None,
    }


class OnnxGenerator:
    """An exported generator file (fp32 or int8) run by onnxruntime on CPU with torch's thread count: images from
    the noise of (seed, index), as `slimflow.sample.sample` draws it for a one-step model, and its cost."""

    def __init__(self, path: str | Path):
        import onnx

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file {str(self.path)!r}")
        self.session = _session(self.path)
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] not in ([INPUT], [INPUT, LABEL]) or len(inputs[0].shape) != 4:
            raise ValueError(
                f"{str(self.path)!r} is not a one-step generator exported by slimflow export (input "
                f"{INPUT!r} of shape (batch, C, H, W), and {LABEL!r} (batch,) when class-conditional); got inputs "
                f"{[(i.name, i.shape) for i in inputs]}"
            )
        self.sample_shape = tuple(int(d) for d in inputs[0].shape[1:])
        model = onnx.load(str(self.path), load_external_data=False)
        self.num_classes = _classes(model)
        if (len(inputs) == 2) != bool(self.num_classes):
            raise ValueError(f"{str(self.path)!r}: a {LABEL!r} input needs a num_classes entry in its metadata")
        graph = model.graph
        qparams = {i for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
        self.params = sum(
            math.prod(t.dims) for t in graph.initializer if t.data_type in WEIGHT_TYPES and t.name not in qparams
        )

    @staticmethod
    def classes_of(path: str | Path) -> int:
        """The class count an exported generator's metadata records (0: unconditional), without a session."""
        import onnx

        return _classes(onnx.load(str(path), load_external_data=False))

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return _run(self.session, z.float().contiguous(), labels)

    def sample(self, n: int, seed: int, batch_size: int, labels=None) -> torch.Tensor:
        """The images of the noise of (seed, 0..n-1), generated in batches; a class-conditional generator's labels
        as `slimflow.sample.sample` takes them (default: class-balanced)."""
        labels = resolve_labels(self, n, labels)
        out = []
        for s in range(0, n, batch_size):
            index = list(range(s, min(n, s + batch_size)))
            out.append(self(noise_for(index, seed, self.sample_shape), None if labels is None else labels[index]))
        return torch.cat(out)

    def cost(self, batch_sizes: tuple[int, ...], warmup: int, repeats: int) -> dict:
        """The keys of `slimflow.cost.measure_cost`: params (the float and int8 initializers, less quantization
        scales and zero points: the fp32 file counts a few constants more than the torch model), latency in
        ms/image at each batch size; MACs and peak memory are not measured (None)."""
        out: dict = {"params": self.params, "macs_per_nfe": None, "nfe": 1, "macs_per_sample": None}
        for batch_size in sorted(batch_sizes):
            labels = _balanced(batch_size, self.num_classes)
            z = _feed(torch.randn(batch_size, *self.sample_shape), labels)
            ms = median_ms(lambda: self.session.run(None, z), torch.device("cpu"), warmup, repeats)  # noqa: B023
            out[f"latency_ms_b{batch_size}"] = ms / batch_size
        out[f"peak_mem_mib_b{max(batch_sizes)}"] = None
        return out


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
    int8: bool = False,
    calibration: int = 64,
    calibration_seed: int = 1,
    calibration_batch: int = 16,
    int8_ops: tuple[str, ...] = INT8_OPS,
    int8_exclude: tuple[str, ...] = (),
    int8_budget: float | None = None,
    int8_fid_budget: float | None = None,
    int8_fid: dict | None = None,
    int8_reduce_range: bool = True,
) -> dict:
    """Export the one-step generator of a velocity model file (any format `teachers.zoo.load_model` reads; a
    reference DDPM++ checkpoint needs `resolution`); returns (and writes as export.json) a report: files, params,
    max abs differences to PyTorch on the noise of (seed, 0..3), and batch-1 latencies. `int8`: also the
    statically quantized ONNX file (see the module docstring for the calibration and int8 settings); `int8_budget`:
    also the mixed-precision file within that image RMSE to fp32 (see `int8_mixed`); `int8_fid_budget`: instead,
    within that relative FID increase over the fp32 file (0.05: +5 %), FID as `int8_fid` says (see INT8_FID)."""
    bad = sorted(set(formats) - set(FORMATS))
    if bad or not formats:
        raise ValueError(f"unknown export formats {bad or formats}; choose from {FORMATS}")
    if int8:
        if "onnx" not in formats:
            raise ValueError(f"int8 quantizes the ONNX file: add 'onnx' to formats (got {list(formats)})")
        check_int8_settings(calibration, calibration_batch, int8_ops)
    if int8_budget is not None and not (int8 and int8_budget > 0):
        raise ValueError(f"int8_budget (a positive image RMSE) needs int8=True, got {int8_budget!r}, int8={int8}")
    if int8_fid_budget is not None:
        if not (int8 and int8_fid_budget > 0) or int8_budget is not None:
            raise ValueError(
                f"int8_fid_budget (a positive relative FID increase) needs int8=True and no int8_budget, got "
                f"{int8_fid_budget!r}, int8={int8}, int8_budget={int8_budget!r}"
            )
        int8_fid = check_fid_settings(int8_fid or {})
    elif int8_fid is not None:
        raise ValueError("int8_fid (the FID measure's settings) is used only with int8_fid_budget")
    if isinstance(model_path, (str, Path)) and Path(model_path).suffix == ".onnx":
        raise ValueError(
            f"{str(model_path)!r} is an exported ONNX file; export takes the velocity model file it came from"
        )
    out = require_writable(out_dir)
    if isinstance(model_path, nn.Module):  # a module in memory: a CPU copy (the caller's module is left as it is)
        velocity = copy.deepcopy(model_path).cpu().eval()
        if getattr(velocity, "sample_shape", None) is None:
            raise ValueError("the module has no sample_shape (C, H, W); set it, or export its model file")
    else:
        velocity = load_model(model_path, device="cpu", resolution=resolution, unsafe_pickle=unsafe_pickle)
    generator = OneStepGenerator(velocity).eval()
    classes = generator.num_classes
    shape = tuple(velocity.sample_shape)
    z = noise_for(list(range(CHECK_BATCH)), seed, shape)
    labels = _balanced(CHECK_BATCH, classes)  # the class-balanced check labels
    expected = generator(z, labels)
    one, one_label = z[:1], None if labels is None else labels[:1]
    report: dict = {
        "model": type(model_path).__name__ if isinstance(model_path, nn.Module) else str(model_path),
        "params": count_params(velocity),
        "input": [INPUT, "batch", *shape],
        **({"label_input": [LABEL, "batch"], "num_classes": classes} if classes else {}),
        "output": [OUTPUT, "batch", *shape],
        "mapping": f"image = z + v(z, {generator.t0:g}), z ~ N(0, I); output not clamped (nominally [-1, 1])",
        "one_step_time": generator.t0,
        "atol": atol,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "torch_latency_ms_b1": median_ms(lambda: generator(one, one_label), one.device, warmup, repeats),
    }
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if classes:
        example, dynamic = (z[:TRACE_BATCH], labels[:TRACE_BATCH]), ({0: batch}, {0: batch})
    else:
        example, dynamic = (z[:TRACE_BATCH],), ({0: batch},)
    program = torch.export.export(generator, example, dynamic_shapes=dynamic)
    if "torch_export" in formats:
        path = out / "generator.pt2"
        torch.export.save(program, str(path))
        diff = _max_abs_diff(torch.export.load(str(path)).module()(z, *([] if labels is None else [labels])), expected)
        _check("torch.export program", diff, atol)
        report["torch_export"] = {"file": str(path), "max_abs_diff": diff}
    if "onnx" in formats:
        path = out / "generator.onnx"
        _export_onnx(program, path, generator.t0, classes)
        report["onnx"] = {"file": str(path), **_check_onnx(path, z, expected, atol, warmup, repeats, labels)}
    if int8:
        path = out / "generator.int8.onnx"
        settings = quantize_int8(
            out / "generator.onnx",
            path,
            shape,
            calibration,
            calibration_seed,
            calibration_batch,
            int8_ops,
            int8_exclude,
            int8_reduce_range,
        )
        check = noise_for(list(range(INT8_CHECK)), seed, shape)
        check_labels = _balanced(INT8_CHECK, classes)
        fp32, int8_session = _session(out / "generator.onnx"), _session(path)
        to_fp32 = image_error(_run(int8_session, check, check_labels), _run(fp32, check, check_labels))
        report["int8"] = {
            "file": str(path),
            **settings,
            "bytes": path.stat().st_size,
            "image_error_to_fp32": {"n": INT8_CHECK, **to_fp32},
            "latency_ms_b1": _latency(int8_session, z, warmup, repeats, labels),
        }
    if int8_budget is not None or int8_fid_budget is not None:
        path = out / "generator.int8-mixed.onnx"
        path.unlink(missing_ok=True)  # a plan of no block writes no file: none may be left from an earlier run
        if int8_budget is not None:
            error = rmse_to_fp32(out / "generator.onnx", check, check_labels)
            budget, measure = int8_budget, {"metric": "rmse"}
        else:
            reference = {"image_size": shape[-1], **int8_fid["reference"]}
            int8_fid = {**int8_fid, "reference": reference}
            error = fid_of_file(int8_fid)
            fp32_fid, int8_fid_value = error(out / "generator.onnx"), error(out / "generator.int8.onnx")
            budget = fp32_fid * (1 + int8_fid_budget)
            measure = {
                "metric": metric_label("fid", int8_fid["extractor"]),
                "fid": {k: v for k, v in int8_fid.items() if k != "cache_dir"},
                "fid_budget": int8_fid_budget,
                "fp32": fp32_fid,
                "int8": int8_fid_value,
            }
        mixed = measure | int8_mixed(
            out / "generator.onnx",
            path,
            shape,
            error,
            budget,
            calibration,
            calibration_seed,
            calibration_batch,
            int8_ops,
            int8_exclude,
            int8_reduce_range,
        )
        if mixed["file"]:
            mixed.update(bytes=path.stat().st_size, latency_ms_b1=_latency(_session(path), z, warmup, repeats, labels))
        report["int8_mixed"] = mixed
    atomic_write_text(out / "export.json", json.dumps(report, indent=1) + "\n")
    return report
