"""The teacher stage follows the stage recipe: it exports a loadable model, skips when current, resumes, and refuses
a run directory started with other settings."""

import pytest

from slimflow.checkpoint import read_model_file
from slimflow.stages.teacher import train_teacher
from teachers.zoo import load_model

TINY = {"preset": None, "nf": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def config(out, **train):
    return {
        "out": str(out),
        "data": {"name": "digits", "image_size": 8},
        "model": TINY,
        "train": {"steps": 4, "batch_size": 8, "warmup": 2, "log_every": 2, "ckpt_every": 2, **train},
        "sample": {"n": 4, "steps": 2},
    }


def test_teacher_stage_exports_skips_and_refuses_changed_settings(tmp_path):
    first = train_teacher(config(tmp_path / "t", steps=2))
    assert first["status"] == "ran" and first["steps"] == 2
    more = train_teacher(config(tmp_path / "t"))  # more steps: a change a run may resume under
    assert more["status"] == "resumed" and more["steps"] == 4
    again = train_teacher(config(tmp_path / "t"))
    assert again["status"] == "skipped"
    sidecar, _ = read_model_file(more["export"])
    assert sidecar["kind"] == "1-rf-teacher" and sidecar["data"]["name"] == "digits"
    teacher = load_model(more["export"])
    assert teacher.sample_shape == (1, 8, 8) and teacher.one_step_time == 0.0
    with pytest.raises(ValueError, match="train.lr: run has 0.0002, requested 0.1"):
        train_teacher(config(tmp_path / "t", lr=0.1))
