"""Every failure a clear message, nothing lost: each test reproduces one defect of the kill and bad-input probe
(issue 12) and fails without its fix. Kills are forced at exact write points through
`slimflow.checkpoint.write_point`, never by timing."""

import json
import os

import pytest
import torch
from tiny_training import make_trainer, train

from slimflow import checkpoint as ckpt
from slimflow.config import ConfigError, load_config
from slimflow.engine import TRAIN_DEFAULTS, check_train_config


class Killed(BaseException):
    """Stands for the process dying at a write point (not an Exception: nothing may catch it)."""


def kill_at(monkeypatch, predicate):
    """Make the first write point whose target path satisfies `predicate` kill the run."""

    def point(path):
        if predicate(path):
            monkeypatch.setattr(ckpt, "write_point", lambda p: None)
            raise Killed(str(path))

    monkeypatch.setattr(ckpt, "write_point", point)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


# 1 ------------------------------------------------------------------------------------------------------------
def test_1_a_kill_while_a_checkpoint_is_replaced_leaves_a_resumable_run(tmp_path, monkeypatch):
    full, _ = train(tmp_path / "full", steps=8)
    train(tmp_path / "cut", steps=8)  # finished: ckpt-00000008 on disk, latest names it
    root = tmp_path / "cut" / "checkpoints"
    trainer = make_trainer(tmp_path / "cut", steps=8)
    trainer.resume()
    # the same step written again (a re-save): killed after the old copy moved aside, before the new one landed
    kill_at(monkeypatch, lambda p: p.name == "ckpt-00000008" and not p.exists())
    with pytest.raises(Killed):
        trainer.save()
    assert not (root / "ckpt-00000008").exists() and (root / "latest").read_text().strip() == "ckpt-00000008"
    resumed, result = train(tmp_path / "cut", steps=8)  # before the fix: "latest names ..., which does not exist"
    assert result["resumed"] and resumed.step == 8 and _same_weights(full.model, resumed.model)
    assert not list(root.glob(".ckpt-*"))


def test_1_the_final_save_does_not_rewrite_a_checkpoint_of_the_same_step(tmp_path, monkeypatch):
    train(tmp_path / "run", steps=8)  # ckpt_every 4: step 8 is written periodically, then the run ends
    kill_at(monkeypatch, lambda p: True)  # any write would be a kill: a finished run writes nothing
    trainer, result = train(tmp_path / "run", steps=8)
    assert result["resumed"] and trainer.step == 8


# 2 ------------------------------------------------------------------------------------------------------------
def test_2_a_kill_between_a_model_file_and_its_sidecar_leaves_no_stale_sidecar(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    path = ckpt.save_model(tmp_path / "m.safetensors", model, {"model": {}, "key": "old"})
    with torch.no_grad():
        model.weight.add_(1.0)
    kill_at(monkeypatch, lambda p: p.suffix == ".json")
    with pytest.raises(Killed):
        ckpt.save_model(path, model, {"model": {}, "key": "new"})
    assert not path.with_suffix(".json").exists()  # before the fix: the old sidecar, with the old sha256
    with pytest.raises(ckpt.CheckpointError, match="run the stage that made it again"):
        ckpt.read_model_file(path)


# 3, 4 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=abc", "'train.lr' .* must be a number, got 'abc'"),
        ("train.lr=nan", "'train.lr' .* must be a number, got 'nan'"),
        ("train.steps=abc", "'train.steps' .* must be an integer"),
        ("train.steps=10.5", "'train.steps' .* must be an integer, got 10.5"),
    ],
)
def test_3_numbers_are_type_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"train": dict(TRAIN_DEFAULTS)}, None, [override])


def test_3_numbers_written_as_yaml_strings_are_read_as_numbers(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 1e-3\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = load_config({"train": dict(TRAIN_DEFAULTS)}, preset, ["train.steps=12.0"])
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["steps"] == 12
    assert isinstance(cfg["train"]["steps"], int)


@pytest.mark.parametrize(
    "key, value",
    [("steps", 0), ("steps", -5), ("batch_size", 0), ("log_every", 0), ("lr", 0.0), ("warmup", -1)],
)
def test_4_and_10_out_of_range_training_settings_stop_before_any_work(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"train.{key} must be"):
        check_train_config({**TRAIN_DEFAULTS, key: value})
    with pytest.raises(ValueError, match=f"train.{key} must be"):
        make_trainer(tmp_path / "run", **{"steps": 4, key: value})
    assert not (tmp_path / "run").exists()


def test_11_a_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        check_train_config({**TRAIN_DEFAULTS, "device": "cuda"})


# 5 ------------------------------------------------------------------------------------------------------------
def test_5_a_deleted_latest_pointer_resumes_from_the_newest_checkpoint(tmp_path):
    full, _ = train(tmp_path / "full", steps=12)
    train(tmp_path / "cut", steps=6)  # checkpoints at 4 and 6
    (tmp_path / "cut" / "checkpoints" / "latest").unlink()
    with pytest.warns(UserWarning, match="resuming from the newest complete checkpoint ckpt-00000006"):
        resumed, result = train(tmp_path / "cut", steps=12)
    assert result["resumed"] and _same_weights(full.model, resumed.model)  # before: restarted at step 0


# 12 -----------------------------------------------------------------------------------------------------------
def test_12_a_sidecar_without_sha256_is_refused(tmp_path):
    path = ckpt.save_model(tmp_path / "m.safetensors", torch.nn.Linear(2, 2), {"model": {}})
    sidecar = json.loads(path.with_suffix(".json").read_text())
    del sidecar["sha256"]
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(ckpt.CheckpointError, match="records no sha256"):
        ckpt.read_model_file(path)


def test_12_partial_temporary_checkpoint_folders_are_removed(tmp_path, monkeypatch):
    kill_at(monkeypatch, lambda p: p.name == "meta.json")
    with pytest.raises(Killed):
        train(tmp_path / "run", steps=8)  # killed inside the first checkpoint's temporary folder
    root = tmp_path / "run" / "checkpoints"
    assert list(root.glob(".ckpt-*.tmp-*"))
    trainer, _ = train(tmp_path / "run", steps=8)
    assert not list(root.glob(".ckpt-*")) and trainer.step == 8


def test_11_messages_name_the_record_that_holds_the_checksum(tmp_path):
    path = ckpt.save_model(tmp_path / "m.safetensors", torch.nn.Linear(2, 2), {"model": {}})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="recorded in m.json"):
        ckpt.read_model_file(path)


# 6 ------------------------------------------------------------------------------------------------------------
def test_6_the_non_finite_loss_message_gives_advice_that_works(tmp_path):
    from tiny_training import loss_fn, make_batch

    from slimflow.engine import NonFiniteLossError
    from slimflow.stages.runner import start_run_dir

    run_config = {"model": {"dim": 2, "hidden": 32, "dropout": 0.1}, "train": {"lr": 1e-2}}
    start_run_dir(tmp_path, run_config)
    trainer = make_trainer(tmp_path, steps=10, ckpt_every=2)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(make_batch, lambda model, batch: loss_fn(model, batch) * float("nan"))
    message = str(info.value)
    assert "re-run to resume" not in message and "new run (another out=" in message
    # what the message says does not work is indeed refused
    with pytest.raises(ValueError, match="other settings"):
        start_run_dir(tmp_path, {**run_config, "train": {"lr": 1e-3}})


# 7, 8 ---------------------------------------------------------------------------------------------------------
TEACHER = "teachers/weights/fmnist_teacher.safetensors"
PAIRS = ["n=4", "shard_size=2", "batch_size=2", "solver.method=euler", "solver.steps=1", "device=cpu"]


def _pairs_cli(out, *extra) -> list[str]:
    import sys

    return [
        sys.executable,
        "-m",
        "slimflow.cli",
        "pairs",
        "generate",
        f"out={out}",
        f"teacher={TEACHER}",
        *PAIRS,
        *extra,
    ]


def test_7_a_manifest_whose_shard_checksum_was_edited_is_repaired_by_generate(tmp_path):
    from slimflow.pairs import PairStore, PairStoreError
    from slimflow.stages.pairs import generate_pairs_from_config

    cfg = load_config(
        {**__import__("slimflow.stages.pairs", fromlist=["DEFAULTS"]).DEFAULTS},
        None,
        [f"out={tmp_path / 'p'}", f"teacher={TEACHER}", *PAIRS],
    )
    generate_pairs_from_config(cfg)
    manifest_path = tmp_path / "p" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][1]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(PairStoreError, match="rerun generate_pairs|sha256"):
        PairStore(tmp_path / "p").verify()
    generate_pairs_from_config(cfg)  # before the fix: "complete", and the store stayed unreadable
    PairStore(tmp_path / "p").verify()


def test_8_two_concurrent_pairs_generate_on_one_store(tmp_path):
    """A real `slimflow pairs generate` next to another writer that holds the store: it stops with a message and
    the store stays correct. The first writer is held inside its first shard until the second has finished."""
    import subprocess
    import sys
    import time

    from slimflow.pairs import PairStore

    out, go = tmp_path / "p", tmp_path / "go"
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time, pathlib; import slimflow.pairs as pairs; make = pairs._make_shard\n"
                "def held(*args, **kwargs):\n"
                f"    pathlib.Path({str(tmp_path / 'started')!r}).touch()\n"
                f"    while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n"
                "    return make(*args, **kwargs)\n"
                "pairs._make_shard = held\n"
                "from slimflow.cli import main; main(sys.argv[1:])"
            ),
            *_pairs_cli(out)[3:],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not (tmp_path / "started").exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(_pairs_cli(out), capture_output=True, text=True, timeout=300)
    finally:
        go.touch()
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode != 0 and "another process is writing the pair store" in second.stderr
    store = PairStore(out)
    store.verify()
    assert len(store) == 4


# 9 ------------------------------------------------------------------------------------------------------------
def _cli_fails(argv, capsys) -> str:
    from slimflow.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    return str(info.value.code)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--config", "configs/quickstart.yaml", "out={file}"],
        ["pairs", "generate", "out={file}"],
        ["anneal", "out={file}", "pairs={tmp}/no-store"],
        ["distill", "out={file}", "pairs={tmp}/no-store"],
        ["prune", "out={file}", "student={tmp}/no-student.safetensors"],
        ["export", "--model", TEACHER, "--out", "{file}"],
        ["sample", "--model", TEACHER, "--out", "{tmp}"],
        ["prune-net", "--model", "torchvision:resnet18", "--out", "{file}"],
    ],
)
def test_9_an_output_that_cannot_be_written_stops_before_any_work(tmp_path, capsys, argv):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    argv = [a.format(file=blocker, tmp=tmp_path) for a in argv]
    message = _cli_fails(argv, capsys)
    assert "existing file" in message or "existing folder" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing was made, no input was even read


# 10 -----------------------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_10_prune_net_weights_of_another_architecture_or_with_pickled_code_are_clear_errors(tmp_path, capsys):
    import torchvision

    other = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": _Evil()}, pickled)
    base = ["prune-net", "--model", "torchvision:resnet18", "--num-classes", "10", "--out", str(tmp_path / "o")]
    assert "does not fit torchvision:resnet18" in _cli_fails([*base, "--checkpoint", str(other)], capsys)
    for flag in ("--checkpoint", "--pretrained"):
        assert "pickles Python objects" in _cli_fails([*base, flag, str(pickled)], capsys)


def test_10_a_sidecar_that_is_not_a_mapping_is_a_clear_error(tmp_path):
    path = ckpt.save_model(tmp_path / "m.safetensors", torch.nn.Linear(2, 2), {"model": {}})
    path.with_suffix(".json").write_text("[1, 2]")
    with pytest.raises(ckpt.CheckpointError, match="not a model sidecar: it holds a list"):
        ckpt.read_model_file(path)


def test_10_a_diffusers_folder_with_a_pickled_bin_is_refused(tmp_path):
    pytest.importorskip("diffusers")
    from teachers.zoo import load_model

    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    torch.save({"weight": _Evil()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ckpt.CheckpointError, match="pickles Python objects"):
        load_model(tmp_path)


# 11 -----------------------------------------------------------------------------------------------------------
def test_11_ctrl_c_outside_training_says_interrupted(tmp_path, capsys, monkeypatch):
    import slimflow.sample

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(slimflow.sample, "sample", interrupted)
    message = _cli_fails(["sample", "--model", TEACHER, "--out", str(tmp_path / "g.png")], capsys)
    assert message == "slimflow sample: interrupted"


def test_11_a_corrupt_manifest_is_named(tmp_path):
    from slimflow.pairs import PairStoreError, store_status

    (tmp_path / "manifest.json").write_text('{"status": "compl')
    with pytest.raises(PairStoreError, match="manifest.json is not valid JSON"):
        store_status(tmp_path)


def test_11_a_malicious_pickle_is_called_what_it_is(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"pickles Python objects \(posix.system\)"):
        ckpt.load_torch_file(path)


def test_11_sample_n_zero_is_a_clear_error(tmp_path, capsys):
    message = _cli_fails(["sample", "--model", TEACHER, "--n", "0", "--out", str(tmp_path / "g.png")], capsys)
    assert "--n must be at least 1" in message


def test_11_16_bit_and_palette_grayscale_pngs_are_one_channel(tmp_path):
    import numpy as np
    from PIL import Image

    from slimflow.data import load_images

    ramp = np.arange(32 * 32).reshape(32, 32)
    Image.fromarray((ramp * 64).astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray((ramp % 256).astype(np.uint8), "L").convert("P").save(tmp_path / "b_palette.png")
    images = load_images("image_folder", root=tmp_path, image_size=32).images
    assert images.shape == (2, 1, 32, 32)  # before: both read as 3-channel
    assert int(images[0].max()) == round(ramp.max() * 64 / 257)  # 16-bit values scaled to 8 bits


def test_11_a_model_with_nan_weights_warns_when_loaded(tmp_path):
    from teachers.unet import build_unet
    from teachers.zoo import load_model

    model = build_unet(
        {
            **{"in_channels": 1, "resolution": 8, "nf": 8, "ch_mult": [1], "num_res_blocks": 1},
            "attn_resolutions": [],
            "dropout": 0.0,
        }
    )
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = ckpt.save_model(tmp_path / "m.safetensors", model, {"model": model.config})
    with pytest.warns(UserWarning, match="non-finite"):
        load_model(path)
