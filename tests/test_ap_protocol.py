"""The AP paper-protocol benchmark (benchmarks/ap-paper-protocol/) at tiny sizes: a run stopped after some cycles
and resumed gives exactly the results of an uninterrupted run, --only splits the work, and the README names the
runs that are missing."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ap-paper-protocol" / "run_ap_protocol.py"
TINY = ["--seeds", "1", "--width", "2", "--rate", "0.5", "--train-images", "128", "--steps", "4"]
TINY += ["--test-images", "100", "--networks", "vgg,resnet"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("run_ap_protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(bench, tmp_path: Path, name: str, *extra: str) -> tuple[Path, Path]:
    work, out = tmp_path / name / "work", tmp_path / name / "out"
    bench.main([*TINY, "--work", str(work), "--out", str(out), *extra])
    return work, out


def records_of(work: Path, stem: str) -> list[dict]:
    return [
        {k: v for k, v in r.items() if not k.endswith("_seconds")}
        for r in json.loads((work / f"{stem}.json").read_text())["records"]
    ]


def test_resumed_run_equals_uninterrupted_run_and_report_names_missing_runs(bench, tmp_path):
    straight, _ = run(bench, tmp_path, "straight", "--cycles", "3", "--only", "network=vgg")
    resumed, out = run(bench, tmp_path, "resumed", "--cycles", "2", "--only", "network=vgg,method=ap")
    readme = (out / "README.md").read_text()
    assert "1 of 4 runs complete" in readme and "vgg-seed0-magnitude missing" in readme
    assert not (resumed / "resnet-seed0-ap.json").exists(), "--only must leave the other runs alone"

    run(bench, tmp_path, "resumed", "--cycles", "3", "--only", "network=vgg")
    for method in ("magnitude", "ap"):
        stem = f"vgg-seed0-{method}"
        assert records_of(resumed, stem) == records_of(straight, stem)
    assert [r["cycle"] for r in records_of(resumed, "vgg-seed0-ap")] == [0, 1, 2, 3]
    assert records_of(resumed, "vgg-seed0-ap")[-1]["sparsity"] == pytest.approx(0.875, abs=0.01)


def test_changed_sizes_are_refused_in_the_same_work_folder(bench, tmp_path):
    run(bench, tmp_path, "a", "--cycles", "1", "--only", "network=vgg,method=magnitude")
    with pytest.raises(SystemExit, match="other sizes"):
        run(bench, tmp_path, "a", "--cycles", "1", "--steps", "5")


def test_only_selection(bench):
    only = bench.parse_only(["network=vgg,seed=1", "method=ap"])
    assert bench.selected(only, "vgg", 1, "magnitude") and bench.selected(only, "resnet", 0, "ap")
    assert not bench.selected(only, "resnet", 0, "magnitude")
    assert bench.selected(only, "resnet", 0)  # the dense model is needed by the selected AP run
    with pytest.raises(SystemExit):
        bench.parse_only(["network"])
