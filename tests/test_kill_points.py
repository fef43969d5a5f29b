"""A kill at every write point of a tiny `slimflow run`, followed by the same command, gives the same final weights
as an uninterrupted run (issue 12). Each case stops the run at one point through `slimflow.checkpoint.write_point`:
the moment just before a finished file or folder is renamed into place."""

import pytest
import torch

from slimflow import checkpoint as ckpt
from slimflow.checkpoint import read_model_file, save_model
from slimflow.stages.run import run_pipeline
from teachers.unet import UNet

WRITE_POINTS = 45  # of the tiny run below; test_the_tiny_run_has_the_expected_write_points keeps it true
TINY = {"preset": None, "nf": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
TRAIN = {"steps": 4, "batch_size": 8, "warmup": 2, "log_every": 2, "ckpt_every": 2}


class Killed(BaseException):
    """The process dying at a write point."""


def config(teacher, out) -> dict:
    return {
        "out": str(out),
        "teacher": str(teacher),
        "pairs": {"n": 16, "solver": {"method": "euler", "steps": 2}, "shard_size": 8, "batch_size": 8},
        "anneal": {"model": TINY, "train": TRAIN, "sample": {"n": 4}},
        "distill": {"train": TRAIN, "sample": {"n": 4}, "loss": {"distance": "l2"}},
        "grids": {"n": 4},
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    torch.manual_seed(0)
    teacher = UNet(1, 8, 8, [1, 2], 1, [], 0.0)
    teacher_file = save_model(root / "teacher.safetensors", teacher, {"model": teacher.config, "kind": "test"})
    points = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt, "write_point", lambda path: points.append(path))
        run_pipeline(config(teacher_file, root / "full"))
    return teacher_file, root / "full", points


def weights(out):
    return {
        stage: read_model_file(out / stage / f"{name}_ema.safetensors")[1]
        for stage, name in (("anneal", "annealed"), ("distill", "distilled"))
    }


def test_the_tiny_run_has_the_expected_write_points(uninterrupted):
    assert len(uninterrupted[2]) == WRITE_POINTS


@pytest.mark.parametrize("point", range(WRITE_POINTS))
def test_a_kill_at_a_write_point_then_the_same_command_gives_the_same_weights(
    uninterrupted, tmp_path, point, monkeypatch
):
    teacher_file, full, _ = uninterrupted
    seen = []

    def write_point(path):
        seen.append(path)
        if len(seen) == point + 1:
            raise Killed(str(path))

    monkeypatch.setattr(ckpt, "write_point", write_point)
    with pytest.raises(Killed):
        run_pipeline(config(teacher_file, tmp_path / "run"))
    monkeypatch.setattr(ckpt, "write_point", lambda path: None)
    summary = run_pipeline(config(teacher_file, tmp_path / "run"))  # the same command again
    expected, got = weights(full), weights(tmp_path / "run")
    for stage in expected:
        assert all(torch.equal(expected[stage][k], got[stage][k]) for k in expected[stage]), (stage, seen[-1])
    assert summary["stages"]["grids"]["l2_to_teacher_ode"] == pytest.approx(
        run_pipeline(config(teacher_file, full))["stages"]["grids"]["l2_to_teacher_ode"]
    )
