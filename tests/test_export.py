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


@pytest.fixture
def tiny_student(tmp_path):
    """A tiny UNet (with attention) whose weights are all random, so v(z, 0) is far from 0."""
    model = build_unet(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    path = save_model(tmp_path / "student.safetensors", model, {"model": model.config, "kind": "test"})
    return path, model.eval()


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
