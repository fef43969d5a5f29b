"""The command line turns bad input into one clear line and a non-zero exit, and its happy paths work."""

import json

import pytest

from slimflow.cli import main

TEACHER = "teachers/weights/fmnist_teacher.safetensors"


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    return str(info.value.code)


def test_unknown_config_key(capsys):
    message = _fails(["teacher", "train", "train.lrr=1"], capsys)
    assert "unknown config key 'train.lrr'" in message and "train.lr" in message


def test_missing_data_directory(tmp_path, capsys):
    message = _fails(["teacher", "train", f"out={tmp_path / 'run'}", f"data.root={tmp_path / 'nowhere'}"], capsys)
    assert "Fashion-MNIST" in message and str(tmp_path / "nowhere") in message


def test_missing_and_corrupt_model_files(tmp_path, capsys):
    assert "no model file" in _fails(["sample", "--model", str(tmp_path / "none.safetensors")], capsys)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"nf": 8}}))
    assert "corrupt" in _fails(["sample", "--model", str(bad)], capsys)


def test_teacher_info_and_sample_on_the_committed_teacher(tmp_path, capsys):
    main(["teacher", "info", TEACHER])
    out = capsys.readouterr().out
    assert "slimflow-model" in out and "1,394,425" in out
    main(
        [
            "sample",
            "--model",
            TEACHER,
            "--steps",
            "2",
            "--n",
            "4",
            "--out",
            str(tmp_path / "g.png"),
            "--npz",
            str(tmp_path / "s.npz"),
        ]
    )
    assert (tmp_path / "g.png").stat().st_size > 0 and (tmp_path / "s.npz").stat().st_size > 0


def test_prune_names_a_missing_student(tmp_path, capsys):
    message = _fails(["prune", f"out={tmp_path / 'p'}", f"student={tmp_path / 'none.safetensors'}"], capsys)
    assert "no model file" in message and "none.safetensors" in message
    assert "unknown config key 'prune.ratoi'" in _fails(["prune", "prune.ratoi=0.3"], capsys)
    # a pair store that is not there (taylor importance reads it) is one line too, not a traceback
    message = _fails(
        [
            "prune",
            f"out={tmp_path / 'p'}",
            f"student={TEACHER}",
            "prune.importance=taylor",
            f"pairs={tmp_path / 'nopairs'}",
        ],
        capsys,
    )
    assert "nopairs" in message


def test_export_int8_bad_input_is_one_clear_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "at least one noise sample" in _fails(
        ["export", "--model", TEACHER, "--out", out, "--int8", "--calibration", "0"], capsys
    )
    message = _fails(
        ["export", "--model", "slimflow/assets/domain_net_fmnist.safetensors", "--out", out, "--int8"], capsys
    )
    assert "is not a velocity model" in message
