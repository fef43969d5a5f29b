"""`run`: pairs → anneal → distill → grids on a tiny random teacher; skipping, resuming after SIGINT, bad input."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from slimflow.checkpoint import content_hash, latest_checkpoint, read_meta, read_model_file, save_model
from slimflow.pairs import PairStoreError
from slimflow.stages.pairs import generate_pairs_from_config, solver_kwargs
from slimflow.stages.run import run_pipeline
from teachers.unet import UNet

TRAIN = {
    "batch_size": 8,
    "warmup": 2,
    "log_every": 5,
    "ckpt_every": 2,
    "keep_ckpts": 1,
    "ema": {"kind": "power", "decay": 0.999, "max_decay": 0.999},
}
STUDENT = {"preset": None, "nf": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
ANNEAL_STEPS = 30


def tiny_teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    teacher = UNet(1, 8, 8, [1, 2], 1, [], 0.0)
    return save_model(path, teacher, {"model": teacher.config, "kind": "test-teacher"})


def config(out: Path, teacher: Path, **changes) -> dict:
    cfg = {
        "out": str(out),
        "teacher": str(teacher),
        "pairs": {"n": 24, "solver": {"method": "heun", "steps": 2}, "shard_size": 8, "batch_size": 8},
        "anneal": {"model": STUDENT, "train": {**TRAIN, "steps": ANNEAL_STEPS}, "sample": {"n": 4}},
        "distill": {"train": {**TRAIN, "steps": 4}, "sample": {"n": 4}},
        "grids": {"n": 6, "seed": 3},
    }
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    teacher = tiny_teacher(root / "teacher.safetensors", seed=0)
    cfg = config(root / "run", teacher)
    return cfg, run_pipeline(cfg)


def test_run_writes_every_output(finished):
    cfg, summary = finished
    out = Path(cfg["out"])
    assert (out / "config.yaml").is_file() and json.loads((out / "summary.json").read_text()) == summary
    assert json.loads((out / "pairs" / "manifest.json").read_text())["status"] == "complete"
    for stage, export in (("anneal", "annealed_ema"), ("distill", "distilled_ema")):
        folder = out / stage
        assert (folder / "config.yaml").is_file() and (folder / "summary.json").is_file()
        assert latest_checkpoint(folder / "checkpoints") is not None
        assert any(p.name.startswith("events.out.tfevents") for p in (folder / "tb").iterdir())
        assert list((folder / "samples").glob("step_*.png"))
        assert (folder / f"{export}.safetensors").is_file() and (folder / f"{export}.json").is_file()
    kinds = {
        read_model_file(out / "anneal" / "annealed_ema.safetensors")[0]["kind"],
        read_model_file(out / "distill" / "distilled_ema.safetensors")[0]["kind"],
    }
    assert kinds == {"annealed-student", "distilled-student"}
    for name in ("teacher_1step", "teacher_ode", "annealed_1step", "distilled_1step", "side_by_side"):
        assert Path(summary["stages"]["grids"]["files"][name]).is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())

    stages = summary["stages"]
    assert [stages[s]["status"] for s in ("pairs", "anneal", "distill", "grids")] == ["ran"] * 4
    assert stages["pairs"]["nfe_per_pair"] == 4.0 and stages["pairs"]["pairs_per_s"] > 0
    assert stages["grids"]["teacher_ode_nfe"] == 4.0
    assert stages["anneal"]["steps"] == ANNEAL_STEPS and stages["distill"]["steps"] == 4
    assert set(stages["distill"]["final_losses"]) == {"loss", "distill", "two_step"}
    assert all(stages[s]["wall_s"] >= 0 for s in stages)
    teacher_params = sum(w.numel() for w in read_model_file(cfg["teacher"])[1].values())
    assert summary["params"]["teacher"] == teacher_params
    assert summary["params"]["annealed"] == summary["params"]["distilled"] < teacher_params
    # all grids share the noise: the teacher's ODE images are the first pairs (same seed and solver)
    assert set(stages["grids"]["l2_to_teacher_ode"]) == {"teacher_1step", "annealed_1step", "distilled_1step"}


def test_second_call_skips_finished_stages(finished):
    cfg, _ = finished
    export = Path(cfg["out"]) / "distill" / "distilled_ema.safetensors"
    before = export.stat().st_mtime_ns
    again = run_pipeline(cfg)
    assert {s: again["stages"][s]["status"] for s in again["stages"]} == {
        "pairs": "skipped",
        "anneal": "skipped",
        "distill": "skipped",
        "grids": "skipped",
    }
    assert export.stat().st_mtime_ns == before


def interrupt_when(path: Path) -> threading.Thread:
    """SIGINT this process as soon as `path` exists (the engine stops after the current step and saves)."""

    def watch():
        deadline = time.time() + 300
        while not path.exists() and time.time() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_interrupted_anneal_stage_resumes_to_the_same_student(finished, tmp_path):
    cfg, reference = finished
    cfg = {**cfg, "out": str(tmp_path / "run")}
    watcher = interrupt_when(tmp_path / "run" / "anneal" / "checkpoints" / "latest")
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGINT"):
        run_pipeline(cfg)
    watcher.join()
    stopped_at = read_meta(latest_checkpoint(tmp_path / "run" / "anneal" / "checkpoints"))["step"]
    assert 2 <= stopped_at < ANNEAL_STEPS
    assert not (tmp_path / "run" / "anneal" / "annealed_ema.safetensors").exists()

    summary = run_pipeline(cfg)
    assert summary["stages"]["pairs"]["status"] == "skipped"
    assert summary["stages"]["anneal"]["status"] == "resumed" and summary["stages"]["distill"]["status"] == "ran"
    resumed = read_model_file(tmp_path / "run" / "anneal" / "annealed_ema.safetensors")[1]
    uninterrupted = read_model_file(Path(reference["stages"]["anneal"]["export"]))[1]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_bad_input_is_refused_with_a_clear_error(finished, tmp_path):
    cfg, _ = finished
    with pytest.raises(FileNotFoundError, match="teacher file .*absent.safetensors.*slimflow teacher train"):
        run_pipeline({**cfg, "out": str(tmp_path / "a"), "teacher": str(tmp_path / "absent.safetensors")})
    # the run folder's pairs were made by the first teacher
    other = tiny_teacher(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(PairStoreError, match="teacher_hash"):
        run_pipeline({**cfg, "teacher": str(other)})
    with pytest.raises(ValueError, match="unknown distillation distance 'lpips-vgg16'"):
        run_pipeline({**cfg, "out": str(tmp_path / "b"), "distill": {"loss": {"distance": "lpips-vgg16"}}})
    assert not (tmp_path / "b").exists(), "settings are checked before any work"
    missing = {"distance": "domain", "options": {"weights_path": str(tmp_path / "no_domain_net.safetensors")}}
    with pytest.raises(FileNotFoundError, match="no_domain_net.safetensors"):
        run_pipeline({**cfg, "out": str(tmp_path / "b"), "distill": {"loss": missing}})
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="unknown solver.method 'rk4'"):
        generate_pairs_from_config({"out": str(tmp_path / "c"), "teacher": cfg["teacher"], "solver": {"method": "rk4"}})


def test_solver_settings_passed_to_the_pair_store():
    solver = {"method": "dopri5", "steps": 8, "rtol": 1e-4, "atol": 1e-6, "max_steps": 100}
    assert solver_kwargs(solver) == {"method": "dopri5", "rtol": 1e-4, "atol": 1e-6, "max_steps": 100}
    assert solver_kwargs({**solver, "method": "midpoint"}) == {"method": "midpoint", "steps": 8}


def test_a_reference_checkpoint_teacher_needs_and_takes_its_resolution(tmp_path):
    """A score_sde/RectifiedFlow .pth (no recorded image size) is a teacher once teacher_resolution is given."""
    torch.manual_seed(0)
    net = UNet(1, 8, 8, [1, 2], 1, [], 0.0)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(
        {
            "model": state,
            "ema": {"decay": 0.999, "num_updates": 1, "shadow_params": [p.detach().clone() for p in net.parameters()]},
            "step": 1,
        },
        tmp_path / "checkpoint_1.pth",
    )
    cfg = config(tmp_path / "run", tmp_path / "checkpoint_1.pth")
    cfg["anneal"]["train"]["steps"] = 2
    with pytest.raises(ValueError, match="pass resolution="):
        run_pipeline(cfg)
    summary = run_pipeline({**cfg, "teacher_resolution": 8})
    manifest = json.loads((tmp_path / "run" / "pairs" / "manifest.json").read_text())
    assert manifest["count"] == 24 and summary["params"]["teacher"] == sum(p.numel() for p in net.parameters())
    assert manifest["teacher_hash"] == content_hash(net)


def test_runs_naming_one_pairs_dir_share_the_store(finished, tmp_path):
    cfg, reference = finished
    shared = Path(reference["stages"]["pairs"]["dir"])
    manifest = (shared / "manifest.json").read_text()
    variant = {
        **cfg,
        "out": str(tmp_path / "variant"),
        "pairs": {**cfg["pairs"], "dir": str(shared)},
        "anneal": {**cfg["anneal"], "hflip": False, "train": {**cfg["anneal"]["train"], "steps": 2}},
    }
    summary = run_pipeline(variant)
    assert summary["stages"]["pairs"]["status"] == "skipped" and summary["stages"]["pairs"]["dir"] == str(shared)
    assert not (tmp_path / "variant" / "pairs").exists() and (shared / "manifest.json").read_text() == manifest
    assert summary["stages"]["anneal"]["status"] == "ran"
    # other pair settings on the shared store are refused, not mixed into it
    with pytest.raises(PairStoreError, match="other settings"):
        run_pipeline({**variant, "out": str(tmp_path / "v2"), "pairs": {**variant["pairs"], "n": 32}})


def test_the_student_can_start_as_the_teacher_pruned_to_a_macs_budget(tmp_path):
    from pruning import count_macs_params
    from teachers.pruned import example_inputs
    from teachers.zoo import load_model

    teacher = tiny_teacher(tmp_path / "teacher.safetensors", seed=0)
    cfg = config(tmp_path / "run", teacher, init_prune={"macs_fraction": 0.5})
    cfg["anneal"]["train"]["steps"], cfg["distill"]["train"]["steps"] = 4, 2
    summary = run_pipeline(cfg)
    pruned_file = Path(summary["stages"]["init_prune"]["file"])
    assert pruned_file == tmp_path / "run" / "init" / "pruned.safetensors"
    inputs = example_inputs(read_model_file(teacher)[0]["model"])
    macs = {
        name: count_macs_params(load_model(path), inputs)[0]
        for name, path in [
            ("teacher", teacher),
            ("pruned", pruned_file),
            ("annealed", summary["stages"]["anneal"]["export"]),
            ("distilled", summary["stages"]["distill"]["export"]),
        ]
    }
    assert abs(macs["pruned"] / macs["teacher"] / 0.5 - 1) < 0.10  # whole GroupNorm groups, nearest the budget
    assert macs["annealed"] == macs["distilled"] == macs["pruned"]  # the pruned network is the student
    sidecar, _ = read_model_file(summary["stages"]["anneal"]["export"])
    assert sidecar["pruning"]["history"] and sidecar["init"]["sha256"]  # it loads pruned, like any pruned file
    again = run_pipeline(cfg)
    assert again["stages"]["init_prune"]["status"] == "skipped" and again["stages"]["anneal"]["status"] == "skipped"
    with pytest.raises(ValueError, match="leave anneal.init unset"):
        run_pipeline({**cfg, "anneal": {**cfg["anneal"], "init": str(teacher)}})
    from slimflow.stages.anneal import check_config

    with pytest.raises(ValueError, match="set init to that file"):
        check_config({"init_architecture": True})


def test_recipe_direct_distills_the_pruned_teacher_with_the_teacher_as_guide(tmp_path):
    """No anneal stage: the distill stage starts from init/pruned.safetensors and its two-step guide is the teacher;
    a second call skips; direct without init_prune, or an unknown recipe, is refused before any work."""
    from teachers.zoo import load_model

    teacher = tiny_teacher(tmp_path / "teacher.safetensors", seed=0)
    cfg = config(tmp_path / "run", teacher, init_prune={"macs_fraction": 0.5}, recipe="direct")
    cfg["distill"]["train"]["steps"] = 3
    summary = run_pipeline(cfg)
    assert "anneal" not in summary["stages"] and not (tmp_path / "run" / "anneal").exists()
    assert summary["params"]["annealed"] is None
    pruned, distilled = summary["stages"]["init_prune"]["file"], summary["stages"]["distill"]["export"]
    sidecar, _ = read_model_file(distilled)
    assert sidecar["pruning"]["history"]  # the pruned network, trained
    assert sidecar["guide"]["file"] == str(teacher) and sidecar["guide"]["kind"] == "test-teacher"
    assert sidecar["config"]["student"] == pruned and sidecar["config"]["guide"] == str(teacher)
    assert sum(p.numel() for p in load_model(distilled).parameters()) == summary["params"]["distilled"]
    assert summary["params"]["distilled"] == sum(p.numel() for p in load_model(pruned).parameters())
    assert summary["params"]["distilled"] < summary["params"]["teacher"]
    z = torch.randn(2, 1, 8, 8)
    t = torch.zeros(2)
    with torch.no_grad():
        assert not torch.equal(load_model(distilled)(z, t), load_model(pruned)(z, t))  # training moved it
    assert set(summary["stages"]["grids"]["files"]) == {
        "teacher_1step",
        "teacher_ode",
        "distilled_1step",
        "side_by_side",
    }
    again = run_pipeline(cfg)
    assert again["stages"]["distill"]["status"] == "skipped"
    for bad, message in (
        ({"init_prune": {"macs_fraction": None}}, "set init_prune.macs_fraction"),
        ({"recipe": "fast"}, "recipe must be one of reflow, direct"),
    ):
        with pytest.raises(ValueError, match=message):
            run_pipeline({**cfg, **bad, "out": str(tmp_path / "bad")})
    assert not (tmp_path / "bad").exists()
