"""Pruning a flow student: UNet-aware channel pruning, model files that load pruned, recovery by distillation."""

import json

import pytest
import torch

from pruning import count_macs_params
from slimflow.checkpoint import read_model_file, save_model
from slimflow.pairs import generate_pairs
from slimflow.sample import one_step_images
from slimflow.stages.prune import prune_model, prune_student
from teachers.pruned import example_inputs
from teachers.unet import AttnBlock, build_unet
from teachers.zoo import load_model

TINY = {
    "in_channels": 1,
    "resolution": 16,
    "nf": 16,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}  # attention at 8x8: the NIN layers are pruned too
PRUNE = {"importance": "l2", "ratio": None, "macs_fraction": 0.5, "steps": 1}
RECOVER = {
    "mode": "one_step",
    "distance": "l2",
    "train": {
        "steps": 60,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup": 5,
        "log_every": 20,
        "ckpt_every": 30,
        "ema": {"kind": "none"},
    },
}


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    """A tiny one-step student with random weights, so v(z, 0) is far from 0 and every channel matters."""
    torch.manual_seed(0)
    model = build_unet(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    root = tmp_path_factory.mktemp("student")
    return save_model(
        root / "student.safetensors", model, {"model": model.config, "kind": "distilled-student", "one_step_time": 0.0}
    )


def outputs(model, seed=1):
    x, _ = example_inputs(TINY, batch=3)
    g = torch.Generator().manual_seed(seed)
    z, t = torch.randn(x.shape, generator=g), torch.rand(3, generator=g)
    with torch.no_grad():
        return model(z, t)


def test_ratio_zero_changes_nothing(student_file):
    student = load_model(student_file)
    pruned, report = prune_model(student, TINY, {**PRUNE, "ratio": 0.0})
    assert report["params_after"] == report["params_before"] and report["macs_after"] == report["macs_before"]
    assert torch.equal(outputs(pruned), outputs(student))


def test_pruned_model_file_loads_bit_identically_everywhere(student_file, tmp_path):
    student = load_model(student_file)
    pruned, report = prune_model(student, TINY, PRUNE)
    macs, params = count_macs_params(pruned, example_inputs(TINY))
    assert (macs, params) == (report["macs_after"], report["params_after"])
    assert macs <= 0.5 * report["macs_before"] and params < report["params_before"]
    # the attention blocks' NIN matrices lost channels together with the convolutions around them
    before = [m.NIN_0.W.shape for m in student.modules() if isinstance(m, AttnBlock)]
    after = [m.NIN_0.W.shape for m in pruned.modules() if isinstance(m, AttnBlock)]
    assert len(after) == len(before) == 3 and all(a[0] < b[0] for a, b in zip(after, before))

    record = {"history": report["history"], "example_inputs": report["example_inputs"]}
    path = save_model(tmp_path / "pruned.safetensors", pruned, {"model": TINY, "pruning": record, "kind": "t"})
    assert torch.equal(outputs(load_model(path)), outputs(pruned))  # every stage loads it this way
    # a pruned file whose record does not match its weights is refused, not half-loaded
    bad = json.loads(path.with_suffix(".json").read_text())
    bad["pruning"]["history"] = []
    path.with_suffix(".json").write_text(json.dumps(bad))
    with pytest.raises(Exception, match="shape|size"):
        load_model(path)


def test_prune_student_recovers_towards_the_unpruned_student_and_resumes(student_file, tmp_path):
    cfg = {
        "out": str(tmp_path / "p"),
        "student": str(student_file),
        "prune": PRUNE,
        "recover": RECOVER,
        "compare": {"n": 16, "seed": 0},
    }
    summary = prune_student(cfg)
    m = summary["models"]
    assert summary["prune"]["status"] == "ran" and summary["recover"]["status"] == "ran"
    assert m["pruned"]["params"] == summary["prune"]["params_after"] < m["unpruned"]["params"]
    assert m["recovered"]["macs"] == m["pruned"]["macs"] <= 0.5 * m["unpruned"]["macs"]
    assert m["unpruned"]["l2_to_unpruned"] == 0.0
    assert m["recovered"]["l2_to_unpruned"] < 0.5 * m["pruned"]["l2_to_unpruned"], m
    assert all((tmp_path / "p" / "grids" / f"{k}.png").is_file() for k in m)

    # the recovered file is a one-step generator any stage reads; same noise -> same images as its weights say
    recovered = load_model(tmp_path / "p" / "recovered_ema.safetensors")
    z = torch.randn(4, 1, 16, 16)
    assert one_step_images(recovered, z).shape == z.shape
    assert read_model_file(tmp_path / "p" / "recovered_ema.safetensors")[0]["pruning"]["history"]
    # the recovery's training run directory loads too (its checkpoints record the pruning), with the same EMA
    assert torch.equal(outputs(load_model(tmp_path / "p" / "recover")), outputs(recovered))

    again = prune_student(cfg)
    assert again["prune"]["status"] == "skipped" and again["recover"]["status"] == "skipped"
    for stage in ("prune", "recover"):  # a skip reports the time the stage took when it ran, and its own apart
        assert again[stage]["seconds"] == summary[stage]["seconds"] != again[stage]["seconds_this_call"]
    assert again["models"]["recovered"]["l2_to_unpruned"] == pytest.approx(m["recovered"]["l2_to_unpruned"])


def test_interrupted_recovery_resumes_to_the_same_weights(student_file, tmp_path):
    base = {"student": str(student_file), "prune": PRUNE, "compare": {"n": 4, "seed": 0}}
    short = {**RECOVER, "train": {**RECOVER["train"], "steps": 30}}
    prune_student({**base, "out": str(tmp_path / "a"), "recover": short})  # stops at step 30 (a checkpoint)
    resumed = prune_student({**base, "out": str(tmp_path / "a"), "recover": RECOVER})
    straight = prune_student({**base, "out": str(tmp_path / "b"), "recover": RECOVER})
    assert straight["recover"]["status"] == "ran"
    assert resumed["prune"]["status"] == "skipped" and resumed["recover"]["status"] == "resumed"
    _, wa = read_model_file(tmp_path / "a" / "recovered_ema.safetensors")
    _, wb = read_model_file(tmp_path / "b" / "recovered_ema.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


def test_taylor_importance_from_the_flow_loss_on_pairs(student_file, pairs_dir, tmp_path):
    cfg = {
        "out": str(tmp_path / "p"),
        "student": str(student_file),
        "pairs": str(pairs_dir),
        "prune": {**PRUNE, "importance": "taylor", "taylor": {"batches": 3, "batch_size": 8}},
        "recover": {"mode": "flow", "train": {**RECOVER["train"], "steps": 4}},
        "compare": {"n": 4, "seed": 0},
    }
    summary = prune_student(cfg)
    assert summary["prune"]["importance"] == "taylor"
    assert summary["models"]["pruned"]["macs"] <= 0.5 * summary["models"]["unpruned"]["macs"]
    # the magnitude ranking removes other channels than the gradient-based one
    magnitude = prune_student({**cfg, "out": str(tmp_path / "m"), "prune": PRUNE, "recover": {"mode": "none"}})
    a = read_model_file(tmp_path / "p" / "pruned.safetensors")[0]["pruning"]["history"]
    b = read_model_file(tmp_path / "m" / "pruned.safetensors")[0]["pruning"]["history"]
    assert a != b and "recovered" not in magnitude["models"]


def test_bad_settings_stop_before_any_work(student_file, tmp_path):
    base = {"out": str(tmp_path / "p"), "student": str(student_file)}
    with pytest.raises(ValueError, match="pair store"):
        prune_student({**base, "prune": {"importance": "taylor"}})
    with pytest.raises(ValueError, match="unknown recover.mode 'finetune'"):
        prune_student({**base, "recover": {"mode": "finetune"}})
    with pytest.raises(ValueError, match="unknown distance 'ssim'"):
        prune_student({**base, "recover": {"distance": "ssim"}})
    with pytest.raises(ValueError, match="unknown prune.importance 'hessian'"):
        prune_student({**base, "prune": {"importance": "hessian"}})
    assert not (tmp_path / "p").exists()
    prune_student({**base, "prune": PRUNE, "recover": {"mode": "none"}, "compare": {"n": 4, "seed": 0}})
    with pytest.raises(ValueError, match="already pruned"):
        prune_student({**base, "out": str(tmp_path / "q"), "student": str(tmp_path / "p" / "pruned.safetensors")})


def test_a_recovered_pruned_student_exports_to_onnx_with_parity(student_file, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the optional extra slimflow[onnx]")
    pytest.importorskip("onnxruntime", reason="the ONNX parity check needs the optional extra slimflow[onnx]")
    from slimflow.stages.export import export_model

    prune_student(
        {
            "out": str(tmp_path / "p"),
            "student": str(student_file),
            "prune": PRUNE,
            "recover": {**RECOVER, "train": {**RECOVER["train"], "steps": 2}},
            "compare": {"n": 4, "seed": 0},
        }
    )
    report = export_model(tmp_path / "p" / "recovered_ema.safetensors", tmp_path / "export", warmup=1, repeats=2)
    assert report["onnx"]["max_abs_diff"] < 1e-4 and report["torch_export"]["max_abs_diff"] < 1e-4


def test_whole_group_pruning_hits_the_budget_and_its_file_reloads_with_the_group_counts(student_file, tmp_path):
    student = load_model(student_file)
    cfg = {**PRUNE, "macs_fraction": 0.6, "macs_match": "nearest", "groupnorm": "whole_groups"}
    pruned, report = prune_model(student, TINY, cfg)
    assert abs(report["macs_after"] / report["macs_before"] / 0.6 - 1) < 0.10
    norms = [m for m in pruned.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_channels // m.num_groups == 4 for m in norms)  # whole groups of 4 left, sizes kept
    unpruned = [m.num_groups for m in student.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert sum(m.num_groups for m in norms) < sum(unpruned)  # the group counts dropped with the channels
    record = {k: report[k] for k in ("history", "example_inputs", "width_attributes", "unwrapped_parameters")}
    path = save_model(tmp_path / "pruned.safetensors", pruned, {"model": TINY, "pruning": record, "kind": "t"})
    assert torch.equal(outputs(load_model(path)), outputs(pruned))


def test_regrouped_groupnorms_are_reported_and_the_pruned_file_reloads(tmp_path):
    """A DDPM++ student whose skip concat (128 + 64 channels) straddles GroupNorm(32, 192) prunes to a MACs budget
    with groupnorm whole_groups+regroup; the regrouped GroupNorms are in the report and the file reloads exactly."""
    config = {**TINY, "resolution": 8, "nf": 64, "attn_resolutions": [4]}
    torch.manual_seed(0)
    student = build_unet(config)
    with torch.no_grad():
        for p in student.parameters():
            p.normal_(0.0, 0.05)
    with pytest.raises(ValueError, match="straddle its groups"):
        prune_model(student, config, {**PRUNE, "ratio": 0.25, "groupnorm": "whole_groups"})
    pruned, report = prune_model(student, config, {**PRUNE, "groupnorm": "whole_groups+regroup"})  # macs_fraction 0.5
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    regrouped = report["regrouped_groupnorms"]
    assert set(regrouped) == {"all_modules.11.GroupNorm_0", "all_modules.14.GroupNorm_0"}
    assert all(r["channels"][1] < r["channels"][0] == 192 and r["groups"] == [32, 32] for r in regrouped.values())
    record = {k: report[k] for k in ("history", "example_inputs", "width_attributes", "unwrapped_parameters")}
    path = save_model(tmp_path / "pruned.safetensors", pruned, {"model": config, "pruning": record, "kind": "t"})
    x, _ = example_inputs(config, batch=3)
    z, t = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), torch.full((3,), 0.5)
    with torch.no_grad():
        assert torch.equal(load_model(path)(z, t), pruned(z, t))


def test_per_layer_macs_match_lands_near_the_budget_and_its_file_reloads(student_file, tmp_path):
    """prune.macs_match nearest_per_layer: one ratio, then whole groups one at a time; the stage's report counts
    the pruned file's MACs, and the file (history with the extra removals) reloads bit-identically."""
    base = {"out": str(tmp_path / "p"), "student": str(student_file), "recover": {"mode": "none"}}
    with pytest.raises(ValueError, match="set prune.groupnorm to whole_groups"):
        prune_student({**base, "prune": {**PRUNE, "macs_match": "nearest_per_layer"}})  # groupnorm even
    assert not (tmp_path / "p").exists()
    prune = {**PRUNE, "macs_fraction": 0.3, "macs_match": "nearest_per_layer", "groupnorm": "whole_groups"}
    summary = prune_student({**base, "prune": prune, "compare": {"n": 4, "seed": 0}})
    stage = summary["prune"]
    assert abs(stage["macs_after"] / stage["macs_before"] / 0.3 - 1) < 0.10 and stage["extra_blocks"] > 0
    pruned = load_model(stage["file"])
    assert (
        count_macs_params(pruned, example_inputs(TINY))[0] == stage["macs_after"] == summary["models"]["pruned"]["macs"]
    )
    direct, _ = prune_model(load_model(student_file), TINY, prune)
    assert torch.equal(outputs(pruned), outputs(direct))


def test_run_init_prune_takes_the_per_layer_match():
    from slimflow.stages import run

    per_layer = {"macs_fraction": 0.182, "macs_match": "nearest_per_layer"}
    run.check_config({"init_prune": per_layer})  # init_prune's groupnorm is whole_groups
    with pytest.raises(ValueError, match="set prune.groupnorm to whole_groups"):
        run.check_config({"init_prune": {**per_layer, "groupnorm": "even"}})
    assert "nearest_per_layer" in run.HELP["init_prune.macs_match"]


PROGRESSIVE = {**PRUNE, "schedule": [0.7, 0.45], "macs_match": "at_most_per_layer", "groupnorm": "whole_groups"}
DISTILL_RECOVER = {
    "mode": "distill",
    "distance": "l2",
    "train": {**RECOVER["train"], "steps": 30, "log_every": 5, "ckpt_every": 5},
}


@pytest.fixture(scope="module")
def pairs_dir(student_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    generate_pairs(
        load_model(student_file),
        root / "pairs",
        n=32,
        shape=[1, 16, 16],
        seed=0,
        solver={"method": "euler", "steps": 2},
        shard_size=32,
        batch_size=32,
        progress=False,
    )
    return root / "pairs"


def progressive(student_file, pairs_dir, out) -> dict:
    return {
        "out": str(out),
        "student": str(student_file),
        "pairs": str(pairs_dir),
        "prune": PROGRESSIVE,
        "recover": DISTILL_RECOVER,
        "compare": {"n": 8, "seed": 0},
    }


def test_bad_progressive_schedules_stop_before_any_work(student_file, pairs_dir, tmp_path):
    cfg = progressive(student_file, pairs_dir, tmp_path / "p")
    for schedule, message in (
        ([0.5, 0.7], "decrease strictly"),
        ([0.5, 0.5], "decrease strictly"),
        ([0.8, 0.0], r"in \(0, 1\]"),
        ([1.2, 0.5], r"in \(0, 1\]"),
        (0.5, "must be a list of numbers"),
        ([0.5, "x"], "must be a list of numbers"),
    ):
        with pytest.raises(ValueError, match=message):
            prune_student({**cfg, "prune": {**PROGRESSIVE, "schedule": schedule}})
    with pytest.raises(ValueError, match="leave prune.ratio null"):
        prune_student({**cfg, "prune": {**PROGRESSIVE, "ratio": 0.3}})
    with pytest.raises(ValueError, match="set prune.channels true"):
        prune_student({**cfg, "prune": {**PROGRESSIVE, "channels": False}})
    with pytest.raises(ValueError, match="shared by the 2 cycles"):
        prune_student({**cfg, "recover": {**DISTILL_RECOVER, "train": {**DISTILL_RECOVER["train"], "steps": 1}}})
    with pytest.raises(ValueError, match="pair store"):
        prune_student({**cfg, "pairs": None})
    assert not (tmp_path / "p").exists()


def test_progressive_pruning_reaches_each_fraction_recovers_on_the_pairs_and_resumes(
    student_file, pairs_dir, tmp_path, monkeypatch
):
    """Two cycles (70% then 45% of the unpruned MACs), each recovered by flow-guided distillation on the pairs for
    half of the 30 steps; a kill inside the second cycle's recovery, then the same command, gives the same weights."""
    from slimflow import checkpoint as ckpt

    summary = prune_student(progressive(student_file, pairs_dir, tmp_path / "full"))
    cycles = summary["channels"]["cycles"]
    assert summary["channels"]["recovery_steps"] == [15, 15]  # a one-shot run trains 30 steps on as many images
    assert [c["recover"]["steps"] for c in cycles] == [15, 15]
    for cycle, fraction in zip(cycles, PROGRESSIVE["schedule"]):
        assert 0.9 * fraction <= cycle["reached"] <= fraction, cycle
    models = summary["models"]
    for cycle in cycles:  # recovery brings the one-step images closer to the unpruned student's (fixed noise)
        assert models[cycle["name"]]["l2_to_unpruned"] < models[cycle["name"] + "-pruned"]["l2_to_unpruned"]
        assert models[cycle["name"]]["macs"] == cycle["macs_after"]
    # the second cycle's file records both cycles' removals and replays them on the unpruned architecture
    first, second = (read_model_file(c["pruned_file"])[0]["pruning"]["history"] for c in cycles)
    assert len(second) > len(first) and second[: len(first)] == first
    final = load_model(summary["channels"]["final"])
    assert count_macs_params(final, example_inputs(TINY))[0] == cycles[-1]["macs_after"]
    rerun = prune_student(progressive(student_file, pairs_dir, tmp_path / "full"))  # skips report the first times
    for before, now in zip(cycles, rerun["channels"]["cycles"]):
        assert now["status"] == now["recover"]["status"] == "skipped"
        assert now["seconds"] == before["seconds"] and now["recover"]["seconds"] == before["recover"]["seconds"]
        assert now["recover"]["seconds_this_call"] < before["recover"]["seconds"]

    class Killed(BaseException):
        pass

    def write_point(path):  # dies just before the second cycle's recovery puts its step-10 checkpoint in place
        if "cycle_2" in str(path) and path.name == "ckpt-00000010":
            raise Killed(str(path))

    monkeypatch.setattr(ckpt, "write_point", write_point)
    with pytest.raises(Killed):
        prune_student(progressive(student_file, pairs_dir, tmp_path / "killed"))
    monkeypatch.setattr(ckpt, "write_point", lambda path: None)
    again = prune_student(progressive(student_file, pairs_dir, tmp_path / "killed"))
    assert [c["status"] for c in again["channels"]["cycles"]] == ["skipped", "skipped"]
    assert again["channels"]["cycles"][1]["recover"]["status"] == "resumed"
    _, expected = read_model_file(summary["channels"]["final"])
    _, got = read_model_file(again["channels"]["final"])
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_round_to_keeps_widths_multiples_of_it_and_new_settings_stay_out_of_old_keys(student_file):
    from slimflow.stages.prune import DEFAULTS, keyed_prune_settings

    student = load_model(student_file)
    cfg = {**PRUNE, "macs_match": "nearest_per_layer", "groupnorm": "whole_groups", "round_to": 8}
    pruned, report = prune_model(student, TINY, cfg)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels > 1]
    assert all(w % 8 == 0 for w in widths) and report["macs_after"] < report["macs_before"]
    assert abs(report["macs_after"] / report["macs_before"] / 0.5 - 1) < 0.10
    with pytest.raises(ValueError, match="round_to needs prune.groupnorm whole_groups"):
        prune_student({"student": str(student_file), "prune": {**PRUNE, "round_to": 8}})
    # configs that leave the new settings at their defaults hash as before they existed
    assert set(keyed_prune_settings(DEFAULTS["prune"])) == {
        "channels", "importance", "ratio", "macs_fraction", "macs_match", "groupnorm", "steps", "taylor"
    }  # fmt: skip
