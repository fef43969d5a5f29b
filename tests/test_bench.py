import csv
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from slimflow.checkpoint import save_model
from slimflow.config import load_config
from slimflow.data import load_images, to_float
from slimflow.domain_net import DEFAULT_WEIGHTS, KIND, DomainNet
from slimflow.stages.bench import DEFAULTS, bench, check_entries, check_prepare, pareto_front
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
    assert {(e["method"], e["steps"]) for e in teacher} == {("euler", 1), ("euler", 4), ("euler", 16), ("euler", 32)}
    assert cfg["metrics"]["extractors"][0] == "domain"
    # every student entry is made by a prepare stage; the two ablation variants share one pair store
    stages = check_prepare(cfg["prepare"])
    outs = [item["config"]["out"] for item in stages]
    assert all(any(e["model"].startswith(out + "/") for out in outs) for e in entries if e not in teacher)
    assert len({item["config"]["pairs"]["dir"] for item in stages if item["stage"] == "run"}) == 1
    by_out = {item["config"]["out"]: item["config"] for item in stages}
    for size in ("s", "m"):
        a, b = by_out[f"runs/ablation/{size}-reflow-l2"], by_out[f"runs/ablation/{size}-slimflow"]
        assert a["anneal"]["model"] == b["anneal"]["model"] == {"preset": f"fmnist-student-{size}"}
        assert (a["anneal"]["beta"]["schedule"], a["anneal"]["beta"]["value"], a["anneal"]["hflip"]) == (
            "constant",
            0.0,
            False,
        )
        assert (a["distill"]["loss"]["distance"], a["distill"]["loss"]["w_2step"]) == ("l2", 0.0)
        assert b["anneal"]["beta"]["schedule"] == "linear" and b["anneal"]["hflip"] is True
        assert b["distill"]["loss"]["w_2step"] > 0 and b["distill"]["loss"]["distance"] == "domain"
        assert a["anneal"]["train"] == b["anneal"]["train"] and a["distill"]["train"] == b["distill"]["train"]
        assert a["pairs"] == b["pairs"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "a", "model": "m", "stpes": 2}, "unknown keys"),
        ({"model": "m"}, "missing"),
        ({"name": "a/b", "model": "m"}, "names files"),
        ({"name": "a", "model": "m", "method": "rk4"}, "unknown method"),
    ],
)
def test_bad_entries_are_rejected(entry, message):
    with pytest.raises(ValueError, match=message):
        check_entries([entry])


def _tiny_model(path: Path, nf: int, seed: int) -> str:
    torch.manual_seed(seed)
    model = build_unet(
        {
            "in_channels": 1,
            "resolution": 32,
            "nf": nf,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        }
    )
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


def assert_hparams_runs(tb: Path, rows: list[dict]) -> None:
    """Each entry is an hparams run tb/<name> (real event files, read back as TensorBoard reads them): its settings
    as hparams, its numbers as the metrics of the HPARAMS table."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    for row in rows:
        run = EventAccumulator(str(tb / row["name"]), size_guidance={"scalars": 0}).Reload()
        content = run.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = {
            k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
            for k, v in start.session_start_info.hparams.items()
        }
        assert hparams["model"] == row["model"] and hparams["method"] == row["method"]
        assert ("steps" in hparams) == (row["steps"] is not None)
        assert hparams.get("steps", row["steps"]) == row["steps"]
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        metrics = {m.name.tag for m in experiment.metric_infos}
        assert {"fid_domain", "kid_domain", "params", "macs_per_nfe", "latency_ms_b1", "nfe"} <= metrics
        for tag, key in (("fid_domain", "FID (domain)"), ("params", "params"), ("latency_ms_b1", "latency_ms_b1")):
            assert run.Scalars(tag)[0].value == pytest.approx(row[key], rel=1e-6), (row["name"], tag)


def test_bench_writes_reports_and_skips_cached_entries(tmp_path, domain_weights):
    small, large = _tiny_model(tmp_path / "small.safetensors", 4, 1), _tiny_model(tmp_path / "large.safetensors", 8, 2)
    cfg = load_config(DEFAULTS)
    cfg.update(
        out=str(tmp_path / "bench"),
        device="cpu",
        grid=16,
        entries=[
            {"name": "large-euler-2", "model": large, "method": "euler", "steps": 2},
            {"name": "large-heun-1", "model": large, "method": "heun", "steps": 1},
            {"name": "small-euler-1", "model": small},
            {"name": "small-dopri5", "model": small, "method": "dopri5", "tol": 1e-3},
        ],
    )
    cfg["reference"]["n"] = 128
    cfg["metrics"].update(
        n_samples=64, batch_size=64, kid_subsets=5, domain_weights=domain_weights, cache_dir=str(tmp_path / "cache")
    )
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
        cell.strip() for cell in header.split("|")
    }
    assert "Inception)" not in table
    for name in ("fid_vs_params.png", "fid_vs_macs.png", "fid_vs_latency.png", *(f"samples/{n}.png" for n in names)):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert events.Tags()["scalars"] == []  # no one-point scalar per entry and figure
    assert {"fid_vs_params", "fid_vs_macs", "fid_vs_latency"} <= set(events.Tags()["images"])
    text = events.Tensors("bench/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| name |" in text and all(f"| {n} |" in text for n in names)
    assert_hparams_runs(out / "tb", first["rows"])

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "entries").iterdir()}
    (out / "tb" / "removed-entry").mkdir()  # the hparams run of an entry no longer in the config
    (out / "tb" / "removed-entry" / "events.out.tfevents.1.host").write_bytes(b"")
    second = bench(cfg, command="pytest")
    assert not (out / "tb" / "removed-entry").exists()
    assert second["computed"] == [] and second["skipped"] == names
    assert second["rows"] == first["rows"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "entries").iterdir()} == stamps
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    assert all(len(list((out / "tb" / n).glob("events.out.tfevents.*"))) == 1 for n in names)

    cfg["entries"][2]["steps"] = 2  # a changed entry is recomputed, the others stay cached
    third = bench(cfg, command="pytest")
    assert third["computed"] == ["small-euler-1"] and third["skipped"] == names[:2] + names[3:]
    assert json.loads((out / "entries" / "small-euler-1.json").read_text())["result"]["nfe"] == 2.0


def test_prepare_makes_the_models_and_compare_sets_entries_side_by_side(tmp_path, domain_weights):
    student = _tiny_model(tmp_path / "student.safetensors", 8, 3)
    cfg = load_config(DEFAULTS)
    pruned = str(tmp_path / "prune" / "pruned.safetensors")
    cfg.update(
        out=str(tmp_path / "bench"),
        device="cpu",
        grid=0,
        entries=[{"name": "student", "model": student}, {"name": "pruned", "model": pruned}],
    )
    cfg["reference"]["n"] = 128
    cfg["metrics"].update(
        n_samples=64, batch_size=64, kid_subsets=5, domain_weights=domain_weights, cache_dir=str(tmp_path / "cache")
    )
    cfg["cost"].update(batch_sizes=[1], warmup=1, repeats=2)
    cfg["prepare"] = [
        {
            "stage": "prune",
            "overrides": [
                f"out={tmp_path / 'prune'}",
                f"student={student}",
                "prune.macs_fraction=0.5",
                "recover.mode=none",
            ],
        }
    ]
    cfg["compare"] = [{"label": "pruning", "baseline": "student", "candidate": "prune"}]
    with pytest.raises(ValueError, match=r"compare names entries that are not in `entries`: \['prune'\]"):
        bench(cfg)
    assert not (tmp_path / "prune").exists()  # checked before any work
    second = {"stage": "prune", "overrides": [f"out={tmp_path / 'other'}", "prune.importance=magnitude"]}
    with pytest.raises(ValueError, match="unknown prune.importance 'magnitude'"):
        bench({**cfg, "compare": [], "prepare": [cfg["prepare"][0], second]})
    assert not (tmp_path / "prune").exists()  # the first stage did not run either

    cfg["compare"][0]["candidate"] = "pruned"
    result = bench(cfg, command="pytest")
    assert Path(pruned).is_file() and result["computed"] == ["student", "pruned"]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["pruned"]["macs_per_nfe"] <= 0.5 * rows["student"]["macs_per_nfe"]
    a, b = rows["student"]["FID (domain)"], rows["pruned"]["FID (domain)"]
    table = (tmp_path / "bench" / "bench.md").read_text()
    assert f"| pruning | student | {a:.4g} | pruned | {b:.4g} | {100 * (b - a) / a:+.1f}% |" in table
    assert table.index("## Comparisons") > table.index("| name")


@pytest.mark.parametrize("preset", sorted(PRESET.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_bench_preset_loads(preset):
    cfg = load_config(DEFAULTS, preset)
    names = {e["name"] for e in check_entries(cfg["entries"])}
    check_prepare(cfg["prepare"])
    assert all({c["baseline"], c["candidate"]} <= names for c in cfg["compare"])
    weights = cfg["metrics"]["domain_weights"]
    assert weights is None or Path(PRESET.parents[2] / weights).is_file()
