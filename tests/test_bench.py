import csv
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from slimflow.bench import DEFAULTS, bench, check_entries, pareto_front
from slimflow.checkpoint import save_model
from slimflow.config import load_config
from slimflow.data import load_images, to_float
from slimflow.domain_net import DEFAULT_WEIGHTS, KIND, DomainNet
from teachers.unet import build_unet

PRESET = Path(__file__).resolve().parents[1] / "configs" / "bench" / "fmnist-cpu.yaml"


def test_pareto_front_on_hand_made_points():
    # (1, 5) best x; (2, 3) twice (equal points do not dominate each other); (3, 4) dominated by (2, 3);
    # (4, 1) best y; (5, 1) dominated by (4, 1) (equal y, larger x); a NaN point is never on the front
    xs = [1, 2, 3, 4, 2, 5, 0.5]
    ys = [5, 3, 4, 1, 3, 1, math.nan]
    assert pareto_front(xs, ys) == [True, True, False, True, True, False, False]
    assert pareto_front([1.0], [2.0]) == [True]


def test_cpu_preset_is_valid():
    cfg = load_config(DEFAULTS, PRESET)
    entries = check_entries(cfg["entries"])
    teacher = [e for e in entries if e["model"] == "teachers/weights/fmnist_teacher.safetensors"]
    assert {(e["method"], e["steps"]) for e in teacher if e["method"] == "euler"} == {("euler", 1), ("euler", 4),
                                                                                     ("euler", 16)}
    assert any(e["method"] == "dopri5" for e in teacher)
    assert cfg["metrics"]["extractors"][0] == "domain"


@pytest.mark.parametrize("entry, message", [
    ({"name": "a", "model": "m", "stpes": 2}, "unknown keys"),
    ({"model": "m"}, "missing"),
    ({"name": "a/b", "model": "m"}, "names files"),
    ({"name": "a", "model": "m", "method": "rk4"}, "unknown method"),
])
def test_bad_entries_are_rejected(entry, message):
    with pytest.raises(ValueError, match=message):
        check_entries([entry])


def _tiny_model(path: Path, nf: int, seed: int) -> str:
    torch.manual_seed(seed)
    model = build_unet({"in_channels": 1, "resolution": 32, "nf": nf, "ch_mult": [1, 2], "num_res_blocks": 1,
                        "attn_resolutions": [], "dropout": 0.0})
    save_model(path, model, {"model": model.config, "kind": "test"})
    return str(path)


@pytest.fixture(scope="module")
def domain_weights(tmp_path_factory):
    if DEFAULT_WEIGHTS.is_file():
        return None  # the committed net
    # no committed weights yet: a seeded random DomainNet with BatchNorm statistics from 512 real images
    net = DomainNet()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        net.train()(to_float(load_images("fashion_mnist", split="test").images[-512:]))
    path = tmp_path_factory.mktemp("domain") / "net.safetensors"
    save_model(path, net.eval(), {"kind": KIND, "model": net.config})
    return str(path)


def test_bench_writes_reports_and_skips_cached_entries(tmp_path, domain_weights):
    small, large = _tiny_model(tmp_path / "small.safetensors", 4, 1), _tiny_model(tmp_path / "large.safetensors", 8, 2)
    cfg = load_config(DEFAULTS)
    cfg.update(out=str(tmp_path / "bench"), device="cpu", grid=16, entries=[
        {"name": "large-euler-2", "model": large, "method": "euler", "steps": 2},
        {"name": "large-heun-1", "model": large, "method": "heun", "steps": 1},
        {"name": "small-euler-1", "model": small},
        {"name": "small-dopri5", "model": small, "method": "dopri5", "tol": 1e-3},
    ])
    cfg["reference"]["n"] = 128
    cfg["metrics"].update(n_samples=64, batch_size=64, kid_subsets=5, domain_weights=domain_weights,
                          cache_dir=str(tmp_path / "cache"))
    cfg["cost"].update(batch_sizes=[1, 4], warmup=1, repeats=2)

    first = bench(cfg, command="pytest")
    names = ["large-euler-2", "large-heun-1", "small-euler-1", "small-dopri5"]
    assert first["computed"] == names and first["skipped"] == []
    out = tmp_path / "bench"
    with open(out / "bench.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == names
    assert [float(r["NFE"]) for r in rows[:3]] == [2.0, 2.0, 1.0] and float(rows[3]["NFE"]) >= 7  # dopri5: 1 + 6k
    assert rows[3]["solver"] == "dopri5 (tol 0.001)" and rows[3]["steps"] == ""
    assert int(rows[0]["params"]) > int(rows[2]["params"]) > 0
    for row in rows:
        assert float(row["FID (domain)"]) > 0 and float(row["latency b1 (ms/img)"]) > 0
        assert int(row["macs_per_sample"]) == int(row["macs_per_nfe"]) * round(float(row["NFE"]))
    table = (out / "bench.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| name"))
    assert {"FID (domain)", "KID (domain)", "precision (domain)", "recall (domain)"} <= {
        cell.strip() for cell in header.split("|")}
    assert "Inception)" not in table
    for name in ("fid_vs_params.png", "fid_vs_latency.png", *(f"samples/{n}.png" for n in names)):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert f"fid_domain/{names[0]}" in events.Tags()["scalars"]
    assert {"fid_vs_params", "fid_vs_latency"} <= set(events.Tags()["images"])

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "entries").iterdir()}
    second = bench(cfg, command="pytest")
    assert second["computed"] == [] and second["skipped"] == names
    assert second["rows"] == first["rows"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "entries").iterdir()} == stamps
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1

    cfg["entries"][2]["steps"] = 2  # a changed entry is recomputed, the others stay cached
    third = bench(cfg, command="pytest")
    assert third["computed"] == ["small-euler-1"] and third["skipped"] == names[:2] + names[3:]
    assert json.loads((out / "entries" / "small-euler-1.json").read_text())["result"]["nfe"] == 2.0
