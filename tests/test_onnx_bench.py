"""A bench entry can be an exported ONNX generator (fp32 or int8): its FID comes from the same bench code."""

import csv

import pytest
import torch

from slimflow.checkpoint import save_model
from slimflow.config import load_config
from slimflow.domain_net import DEFAULT_WEIGHTS
from slimflow.stages.bench import DEFAULTS, bench, check_entries
from slimflow.stages.export import OnnxGenerator, export_model
from teachers.unet import build_unet


def test_an_onnx_entry_is_a_one_step_generator():
    with pytest.raises(ValueError, match="exported one-step generator"):
        check_entries([{"name": "q", "model": "runs/export/generator.int8.onnx", "steps": 2}])
    with pytest.raises(ValueError, match="exported one-step generator"):
        check_entries([{"name": "q", "model": "g.onnx", "method": "heun"}])
    assert check_entries([{"name": "q", "model": "g.onnx"}])[0]["steps"] == 1


def test_bench_evaluates_exported_onnx_files(tmp_path):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason="ONNX export needs the optional extra slimflow[onnx]")
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("needs the committed domain net")
    torch.manual_seed(0)
    config = {"in_channels": 1, "resolution": 32, "nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1}
    model = build_unet({**config, "attn_resolutions": [16], "dropout": 0.0})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.03)
    path = save_model(tmp_path / "student.safetensors", model, {"model": model.config, "kind": "test"})
    export_model(path, tmp_path / "export", formats=("onnx",), warmup=0, repeats=1, int8=True, calibration=16)
    fp32, int8 = tmp_path / "export" / "generator.onnx", tmp_path / "export" / "generator.int8.onnx"
    assert OnnxGenerator(fp32).sample_shape == (1, 32, 32)

    cfg = load_config(DEFAULTS)
    cfg.update(
        out=str(tmp_path / "bench"),
        device="cpu",
        grid=0,
        entries=[
            {"name": "torch", "model": str(path)},
            {"name": "onnx-fp32", "model": str(fp32)},
            {"name": "onnx-int8", "model": str(int8)},
        ],
    )
    cfg["reference"]["n"] = 128
    cfg["metrics"].update(n_samples=64, batch_size=32, kid_subsets=5, cache_dir=str(tmp_path / "cache"))
    cfg["cost"].update(batch_sizes=[1, 4], warmup=1, repeats=2)
    result = bench(cfg, command="pytest")
    rows = {row["name"]: row for row in result["rows"]}
    fid = {name: row["FID (domain)"] for name, row in rows.items()}
    # the fp32 file makes the torch model's images of the same noise (to ~1e-6), hence the same FID
    assert fid["onnx-fp32"] == pytest.approx(fid["torch"], rel=1e-3)
    assert fid["onnx-int8"] > 0 and fid["onnx-int8"] != fid["onnx-fp32"]
    for name in ("onnx-fp32", "onnx-int8"):
        row = rows[name]
        assert row["device"] == "cpu (onnxruntime)" and row["nfe"] == 1
        assert row["macs_per_nfe"] is None and row["latency_ms_b1"] > 0 and row["latency_ms_b4"] > 0
        assert row["params"] == pytest.approx(rows["torch"]["params"], rel=0.01)
    with open(tmp_path / "bench" / "bench.csv") as handle:
        table = {r["name"]: r for r in csv.DictReader(handle)}
    assert table["onnx-int8"]["macs_per_nfe"] == "" and float(table["onnx-int8"]["FID (domain)"]) > 0
    assert "| onnx-int8 |" in (tmp_path / "bench" / "bench.md").read_text()
