import json

import pytest
import torch

from slimflow.checkpoint import save_model
from slimflow.stages.export import OneStepGenerator, export_model
from teachers.unet import build_unet

TINY = {
    "in_channels": 1,
    "resolution": 16,
    "nf": 8,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}


def _tiny_student(folder):
    model = build_unet(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    path = save_model(folder / "student.safetensors", model, {"model": model.config, "kind": "test"})
    return path, model.eval()


@pytest.fixture
def tiny_student(tmp_path):
    """A tiny UNet (with attention) whose weights are all random, so v(z, 0) is far from 0."""
    return _tiny_student(tmp_path)


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    """The tiny student exported once to ONNX with its int8 file (calibration: 8 noise samples)."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason="ONNX export needs the optional extra slimflow[onnx]")
    folder = tmp_path_factory.mktemp("int8")
    path, model = _tiny_student(folder)
    report = export_model(path, folder / "a", formats=("onnx",), warmup=0, repeats=1, int8=True, calibration=8)
    return folder, model, report


def test_onnx_and_torch_export_match_pytorch(tiny_student, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the optional extra slimflow[onnx]")
    pytest.importorskip("onnxscript", reason="ONNX export needs the optional extra slimflow[onnx]")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX parity check needs the optional extra slimflow[onnx]")
    path, model = tiny_student
    report = export_model(path, tmp_path / "export", warmup=1, repeats=3)
    assert report["onnx"]["max_abs_diff"] < 1e-4 and report["torch_export"]["max_abs_diff"] < 1e-4
    assert report["onnx"]["latency_ms_b1"] > 0 and report["torch_latency_ms_b1"] > 0
    assert json.loads((tmp_path / "export" / "export.json").read_text()) == report

    # the files take any batch size and compute z + v(z, 0)
    z = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = OneStepGenerator(model)(z)
        assert (expected - z).abs().max() > 0.1  # the check is not trivially z ↦ z
        program = torch.export.load(str(tmp_path / "export" / "generator.pt2")).module()
        torch.testing.assert_close(program(z), expected, atol=1e-5, rtol=1e-5)
    session = ort.InferenceSession(str(tmp_path / "export" / "generator.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: z.numpy()})[0]
    assert abs(got - expected.numpy()).max() < 1e-4


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown export formats"):
        export_model(tmp_path / "missing.safetensors", tmp_path, formats=("tflite",))


def test_onnx_file_is_conventional(int8_export):
    """Inputs and outputs named noise -> image, the batch axis named, t0 recorded, no debugging notes."""
    import onnx

    folder, _, _ = int8_export
    model = onnx.load(str(folder / "a" / "generator.onnx"))
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # noqa: E731
    assert [(v.name, dims(v)) for v in model.graph.input] == [("noise", ["batch", 1, 16, 16])]
    assert [(v.name, dims(v)) for v in model.graph.output] == [("image", ["batch", 1, 16, 16])]
    assert {p.key: p.value for p in model.metadata_props}["one_step_time"] == "0.0"
    assert not any(node.metadata_props for node in model.graph.node)


def test_int8_export_runs_close_to_fp32_smaller_and_deterministic(int8_export, tmp_path):
    import onnx
    import onnxruntime as ort

    from slimflow.flow import noise_for
    from slimflow.stages.export import quantize_int8

    folder, model, report = int8_export
    int8 = report["int8"]
    fp32_file, int8_file = folder / "a" / "generator.onnx", folder / "a" / "generator.int8.onnx"
    assert int8["bytes"] == int8_file.stat().st_size < fp32_file.stat().st_size == report["onnx"]["bytes"]
    assert int8["calibration"] == 8 and int8["latency_ms_b1"] > 0

    # it is quantized: int8 weights per output channel, uint8 activations, in QDQ form
    graph = onnx.load(str(int8_file)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") >= ops.count("Conv") > 0
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == ops.count("Conv")

    # bounded error to fp32 on fixed noise, measured here with onnxruntime itself
    z = noise_for(list(range(16)), 5, (1, 16, 16)).numpy()
    got = ort.InferenceSession(str(int8_file), providers=["CPUExecutionProvider"]).run(None, {"noise": z})[0]
    with torch.no_grad():
        expected = OneStepGenerator(model)(torch.from_numpy(z)).numpy()
    error = abs(got - expected)
    assert error.mean() < 0.02 and error.max() < 0.25, (error.mean(), error.max())
    assert error.max() > 0  # it is not the fp32 file under another name
    assert int8["image_error_to_fp32"]["mean_abs_diff"] < 0.02

    # the same calibration noise gives the same file, byte for byte; other noise another file
    again, other = tmp_path / "again.onnx", tmp_path / "other.onnx"
    quantize_int8(fp32_file, again, (1, 16, 16), calibration=8, calibration_seed=1)
    quantize_int8(fp32_file, other, (1, 16, 16), calibration=8, calibration_seed=2)
    assert again.read_bytes() == int8_file.read_bytes() != other.read_bytes()


def test_int8_nodes_left_in_fp32(int8_export, tmp_path):
    """int8_exclude keeps the named nodes in fp32; the time embedding (no dependence on the noise) is never
    quantized; int8_ops limits what is."""
    import onnx

    from slimflow.stages.export import noise_path_excluded, quantize_int8

    folder, _, _ = int8_export
    fp32_path = folder / "a" / "generator.onnx"
    fp32 = onnx.load(str(fp32_path))
    convs = [node.name for node in fp32.graph.node if node.op_type == "Conv"]
    time_branch = set(noise_path_excluded(fp32))
    assert any(n.op_type == "Gemm" for n in fp32.graph.node if n.name in time_branch)  # the time MLP
    assert not time_branch & set(convs)

    def quantized(out, **kwargs) -> set[str]:
        quantize_int8(fp32_path, out, (1, 16, 16), 4, 1, **kwargs)
        graph = onnx.load(str(out)).graph
        dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        return {n.name for n in graph.node if n.op_type in ("Conv", "MatMul") and n.input[0] in dequantized}

    everything = quantized(tmp_path / "all.onnx")
    assert set(convs) <= everything
    assert quantized(tmp_path / "ex.onnx", int8_exclude=(convs[0], convs[-1])) == everything - {convs[0], convs[-1]}
    assert quantized(tmp_path / "conv.onnx", int8_ops=("Conv",)) == set(convs)
    with pytest.raises(ValueError, match="not in"):
        quantize_int8(fp32_path, tmp_path / "x.onnx", (1, 16, 16), 4, 1, int8_exclude=("nope",))


def test_mixed_precision_plan_within_an_error_budget(int8_export, tmp_path):
    """The scan ranks every block; the plan quantizes the least sensitive ones within the budget, and adding the
    next block would break it."""
    import onnxruntime as ort

    from slimflow.flow import noise_for
    from slimflow.stages.export import block_of, image_error, int8_mixed, quantize_int8, rmse_to_fp32

    folder, _, report = int8_export
    fp32_path = folder / "a" / "generator.onnx"
    check = noise_for(list(range(16)), 0, (1, 16, 16))
    full = report["int8"]["image_error_to_fp32"]["rmse"]
    budget = full / 2
    plan = int8_mixed(fp32_path, tmp_path / "mixed.onnx", (1, 16, 16), rmse_to_fp32(fp32_path, check), budget, 8, 1)
    ranked = [row["error_alone"] for row in plan["scan"]]
    assert ranked == sorted(ranked) and len(ranked) >= 5  # stem conv, res blocks, attention, output conv
    assert plan["int8_blocks"] and plan["fp32_blocks"]
    assert plan["int8_blocks"] + plan["fp32_blocks"] == [row["block"] for row in plan["scan"]]

    def rmse(path) -> float:
        run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
            None, {"noise": check.numpy()}
        )[0]  # noqa: E731
        return image_error(torch.from_numpy(run(path)), torch.from_numpy(run(fp32_path)))["rmse"]

    assert rmse(tmp_path / "mixed.onnx") == pytest.approx(plan["error"]) and plan["error"] <= budget
    import onnx

    graph = onnx.load(str(tmp_path / "mixed.onnx")).graph
    quantized = {n.name for n in graph.node if n.op_type == "DequantizeLinear"}
    assert quantized and all(block_of(n.name) not in plan["fp32_blocks"] for n in graph.node if n.name in quantized)
    # one block more breaks the budget
    blocks = {*plan["int8_blocks"], plan["fp32_blocks"][0]}
    nodes = [n.name for n in onnx.load(str(fp32_path)).graph.node if n.op_type in ("Conv", "MatMul")]
    quantize_int8(
        fp32_path,
        tmp_path / "more.onnx",
        (1, 16, 16),
        8,
        1,
        int8_exclude=[n for n in nodes if block_of(n) not in blocks],
    )
    assert rmse(tmp_path / "more.onnx") > budget


def test_mixed_precision_plan_within_a_fid_budget(int8_export, tmp_path):
    """With a FID budget, every file is scored by its FID against the reference, as bench computes it from the
    fp32 model's own one-step images; the plan's file is within the budget and its score is the one reported."""
    from slimflow.data import to_uint8
    from slimflow.flow import noise_for
    from slimflow.metrics import compute_metrics
    from slimflow.sample import one_step_images
    from slimflow.stages.export import fid_of_file

    folder, model, _ = int8_export
    fid = {"reference": {"name": "fashion_mnist", "split": "test", "n": 300}, "n": 64, "cache_dir": str(tmp_path)}
    report = export_model(
        folder / "student.safetensors",
        tmp_path / "out",
        formats=("onnx",),
        warmup=0,
        repeats=1,
        int8=True,
        calibration=8,
        int8_fid_budget=0.5,
        int8_fid=fid,
    )
    mixed = report["int8_mixed"]
    assert mixed["metric"] == "FID (domain)" and mixed["fid"]["reference"]["image_size"] == 16
    assert mixed["budget"] == pytest.approx(mixed["fp32"] * 1.5)
    ranked = [row["error_alone"] for row in mixed["scan"]]
    assert ranked == sorted(ranked) and len(ranked) >= 5
    with torch.no_grad():
        own = to_uint8(one_step_images(model, noise_for(list(range(64)), 0, (1, 16, 16))))
    reference = {"name": "fashion_mnist", "split": "test", "n": 300, "image_size": 16}
    direct = compute_metrics(own, reference, metrics=("fid",), cache_dir=tmp_path, device="cpu", progress=False)
    assert mixed["fp32"] == pytest.approx(direct["FID (domain)"], rel=1e-3)
    if mixed["file"]:
        score = fid_of_file({**mixed["fid"], "cache_dir": str(tmp_path)})
        assert score(tmp_path / "out" / "generator.int8-mixed.onnx") == pytest.approx(mixed["error"])
        assert mixed["error"] <= mixed["budget"]
    else:
        assert min(ranked) > mixed["budget"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"calibration": 0}, ValueError, "at least one noise sample"),
        ({"calibration": -3}, ValueError, "at least one noise sample"),
        ({"calibration_batch": 0}, ValueError, "calibration_batch"),
        ({"int8_ops": ()}, ValueError, "int8_ops"),
        ({"formats": ("torch_export",)}, ValueError, "add 'onnx' to formats"),
        ({"int8_budget": 0.0}, ValueError, "int8_budget"),
        ({"int8_fid_budget": -0.1}, ValueError, "int8_fid_budget"),
        ({"int8_fid_budget": 0.1, "int8_budget": 0.01}, ValueError, "no int8_budget"),
        ({"int8_fid_budget": 0.1, "int8_fid": {"n": 1}}, ValueError, "samples per FID"),
        ({"int8_fid_budget": 0.1, "int8_fid": {"samples": 10}}, ValueError, "unknown int8_fid keys"),
        ({"int8_fid": {"n": 10}}, ValueError, "only with int8_fid_budget"),
        (
            {"int8_fid_budget": 0.1, "int8_fid": {"weights": "missing.safetensors"}},
            FileNotFoundError,
            "missing.safetensors",
        ),
    ],
)
def test_bad_int8_settings_fail_before_any_work(tmp_path, kwargs, error, match):
    """The model file does not exist and the output folder is not made: the settings are checked first."""
    with pytest.raises(error, match=match):
        export_model(tmp_path / "missing.safetensors", tmp_path / "out", int8=True, **kwargs)
    assert not (tmp_path / "out").exists()


def test_int8_without_onnxruntime_fails_before_any_work(tmp_path, monkeypatch):
    import sys

    # a None entry in sys.modules makes `import onnxruntime` raise ImportError, as when it is not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with pytest.raises(ImportError, match=r"int8 export needs onnxruntime.*pip install 'slimflow\[onnx\]'"):
        export_model(tmp_path / "missing.safetensors", tmp_path / "out", int8=True)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_velocity_model_is_refused(tmp_path):
    from slimflow.checkpoint import CheckpointError
    from slimflow.domain_net import DEFAULT_WEIGHTS

    with pytest.raises(CheckpointError, match="is not a velocity model.*domain_net"):
        export_model(DEFAULT_WEIGHTS, tmp_path / "out", int8=True)
    assert not any((tmp_path / "out").iterdir())  # nothing written
    onnx_file = tmp_path / "generator.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    with pytest.raises(ValueError, match="is an exported ONNX file"):
        export_model(onnx_file, tmp_path / "out2", int8=True)
