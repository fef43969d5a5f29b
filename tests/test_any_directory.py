"""The installed command works from any directory: presets found by name, shipped weights found, --print-config
and --version (issue 13)."""

import json
import os
import shutil
import subprocess
import sys

import yaml

CLI = [sys.executable, "-m", "slimflow.cli"]


def slimflow(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_print_config_from_an_empty_directory(tmp_path):
    done = slimflow(["run", "--config", "quickstart", "--print-config", "pairs.n=16"], tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    assert cfg["teacher"] == "teachers/weights/fmnist_teacher.safetensors" and cfg["pairs"]["n"] == 16
    assert cfg["anneal"]["model"] == {"preset": "fmnist-student-s"}  # the quickstart preset, merged
    assert list(tmp_path.iterdir()) == []  # printing writes nothing
    # a repository-style path to a preset works too, and a wrong name lists the presets
    assert slimflow(["bench", "--config", "configs/bench/fmnist-cpu.yaml", "--print-config"], tmp_path).returncode == 0
    wrong = slimflow(["run", "--config", "quickstrat", "--print-config"], tmp_path)
    assert wrong.returncode != 0 and "presets: " in wrong.stderr and "quickstart" in wrong.stderr


def test_version(tmp_path):
    done = slimflow(["--version"], tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("slimflow ")


def test_a_tiny_quickstart_run_completes_in_an_empty_directory(tmp_path):
    overrides = [
        "pairs.n=16", "pairs.shard_size=16", "pairs.batch_size=16", "pairs.solver.steps=1",
        "anneal.train.steps=2", "anneal.train.batch_size=8", "anneal.train.warmup=1", "anneal.beta.steps=2",
        "anneal.sample.n=4", "distill.train.steps=2", "distill.train.batch_size=8", "distill.train.warmup=1",
        "distill.sample.n=4", "grids.n=4",
    ]  # fmt: skip
    done = slimflow(["run", "--config", "quickstart", *overrides], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert (
        summary["stages"]["distill"]["steps"] == 2 and (tmp_path / "runs/quickstart/grids/side_by_side.png").is_file()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # everything it wrote is under out
    shutil.rmtree(tmp_path / "runs")
