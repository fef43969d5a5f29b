"""`slimflow teacher info`: recognise a checkpoint's format, architecture, size and time convention, or say why not."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimflow.checkpoint import CheckpointError, rng_state, save_model, save_training_checkpoint
from teachers.formats import ddpmpp_config_guess, detect_format
from teachers.inspect import describe_checkpoint, format_summary
from teachers.unet import build_unet
from teachers.zoo import load_model as load_teacher

FIXTURE = Path(__file__).parent / "fixtures" / "ddpmpp_reference_shapes.json"
TINY = {
    "in_channels": 3,
    "resolution": 16,
    "nf": 16,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 2,
    "attn_resolutions": [8],
}


@pytest.fixture
def tiny_unet():
    return build_unet(TINY)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reference_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    """A score_sde-style checkpoint: DataParallel 'module.' keys + sigmas under 'model', EMA shadow list, step."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.sigmas"] = torch.linspace(50, 0.01, 1000)
    ema = {"decay": 0.999999, "num_updates": 7, "shadow_params": [p.detach().clone() for p in model.parameters()]}
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "model": state, "ema": ema, "step": 7}, path)
    return path


def test_exported_project_model(tmp_path, tiny_unet):
    path = save_model(
        tmp_path / "teacher.safetensors",
        tiny_unet,
        {"model": tiny_unet.config, "kind": "1-rf-teacher", "time_convention": "t=0 noise, t=1 data"},
    )
    info = describe_checkpoint(path)
    assert info["format"] == "slimflow-model" and info["params"] == params(tiny_unet)
    assert info["architecture"] == tiny_unet.config and info["prediction"] == "velocity"
    assert info["time_convention"] == "t=0 noise, t=1 data" and "kind: 1-rf-teacher" in info["notes"]
    teacher = load_teacher(path)
    assert teacher.sample_shape == (3, 16, 16)
    assert teacher(torch.randn(2, 3, 16, 16), torch.rand(2)).shape == (2, 3, 16, 16)


def test_training_checkpoint_run_dir_and_files(tmp_path, tiny_unet):
    ckpt = save_training_checkpoint(
        tmp_path / "run",
        12,
        model=tiny_unet,
        optimizer=None,
        ema=tiny_unet,
        config={"model": tiny_unet.config},
        rng=rng_state(),
    )
    for path in (tmp_path / "run", ckpt, ckpt / "model.safetensors"):
        info = describe_checkpoint(path)
        assert info["format"] == "slimflow-checkpoint" and info["params"] == params(tiny_unet)
        assert info["architecture"] == tiny_unet.config and "step 12, EMA weights described" in info["notes"]


def test_reference_checkpoint_architecture_guess(tmp_path, tiny_unet):
    info = describe_checkpoint(reference_checkpoint(tmp_path / "checkpoint_7.pth", tiny_unet))
    assert info["format"] == "reference-ddpmpp" and info["params"] == params(tiny_unet)
    assert info["architecture"] == {
        "nf": 16,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 2,
        "attn_levels": [1],
        "in_channels": 3,
    }
    assert "state dict found at 'model'; its 'ema' weights load into teachers.unet.UNet" in info["notes"]
    assert any("shadow parameters" in n for n in info["notes"])
    assert "999*t" in info["time_convention"]
    summary = format_summary(info)
    assert "format:          reference-ddpmpp" in summary and f"{params(tiny_unet):,}" in summary
    bare = tmp_path / "bare.pth"
    torch.save(tiny_unet.state_dict(), bare)
    assert detect_format(bare) == "reference-ddpmpp"


def test_reference_checkpoint_loads_as_a_teacher(tmp_path, tiny_unet):
    path = reference_checkpoint(tmp_path / "checkpoint_7.pth", tiny_unet)
    with pytest.raises(ValueError, match="does not record its image resolution: pass resolution="):
        load_teacher(path)
    teacher = load_teacher(path, resolution=16)
    assert teacher.sample_shape == (3, 16, 16)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    torch.testing.assert_close(teacher(x, t), tiny_unet.eval()(x, t))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["ema"]["shadow_params"].pop()  # an EMA made for another architecture
    torch.save(checkpoint, tmp_path / "bad_ema.pth")
    with pytest.raises(CheckpointError, match="bad_ema.pth'.*shadow_params.*287"):
        describe_checkpoint(tmp_path / "bad_ema.pth")


def test_architecture_guess_for_the_five_slimflow_configurations():
    fixture = json.loads(FIXTURE.read_text())
    for name, entry in fixture.items():
        shapes = {k: tuple(s) for k, s in entry["state_dict_shapes"].items() if k != "sigmas"}
        config = entry["config"]
        guess = ddpmpp_config_guess(shapes)
        assert (guess["nf"], guess["ch_mult"], guess["num_res_blocks"], guess["in_channels"]) == (
            config["nf"],
            config["ch_mult"],
            config["num_res_blocks"],
            config["num_channels"],
        ), name
        assert guess["attn_levels"] == [1], name  # attention at 16² of a 32² model
        assert sum(math.prod(s) for s in shapes.values()) == entry["params"], name


def test_diffusers_folder_is_described_without_the_extra(tmp_path):
    folder = tmp_path / "ddpm"
    folder.mkdir()
    config = {
        "_class_name": "UNet2DModel",
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {"conv_in.weight": torch.zeros(32, 3, 3, 3), "conv_in.bias": torch.zeros(32)},
        str(folder / "diffusion_pytorch_model.safetensors"),
    )
    (folder / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", "prediction_type": "v_prediction"})
    )
    info = describe_checkpoint(folder)
    assert info["format"] == "diffusers" and info["params"] == 32 * 27 + 32 and info["prediction"] == "v_prediction"
    assert info["architecture"]["block_out_channels"] == [32, 64] and "t in [0.0063, 0.9901]" in info["time_convention"]
    (folder / "diffusion_pytorch_model.safetensors").unlink()  # older folders hold a torch .bin instead
    torch.save({"conv_in.weight": torch.zeros(32, 3, 3, 3)}, folder / "diffusion_pytorch_model.bin")
    assert describe_checkpoint(folder)["params"] == 32 * 27
    (folder / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="has no diffusion_pytorch_model weights"):
        describe_checkpoint(folder)


def test_plain_state_dicts(tmp_path, tiny_unet):
    torch.save({"state_dict": {"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4)}}, tmp_path / "cls.pt")
    info = describe_checkpoint(tmp_path / "cls.pt")
    assert info["format"] == "state-dict" and info["params"] == 16 and info["prediction"] == "unknown"
    save_file({"w": torch.zeros(5)}, str(tmp_path / "bare.safetensors"))
    assert describe_checkpoint(tmp_path / "bare.safetensors")["params"] == 5
    with pytest.raises(CheckpointError, match="plain state dict: it does not record its architecture"):
        load_teacher(tmp_path / "cls.pt")


def test_missing_unknown_and_corrupt_files(tmp_path, tiny_unet):
    with pytest.raises(FileNotFoundError, match="no model file or checkpoint at"):
        describe_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="unknown checkpoint format: .*neither a PyTorch file"):
        describe_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="unknown checkpoint format: directory"):
        describe_checkpoint(tmp_path / "folder")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="unknown checkpoint format: no name -> tensor mapping"):
        describe_checkpoint(tmp_path / "list.pth")

    good = reference_checkpoint(tmp_path / "good.pth", tiny_unet).read_bytes()
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth' is corrupt or truncated"):
        describe_checkpoint(tmp_path / "truncated.pth")
    save_file({"w": torch.zeros(1000)}, str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        describe_checkpoint(tmp_path / "cut.safetensors")

    path = save_model(tmp_path / "flipped.safetensors", tiny_unet, {"model": tiny_unet.config})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        describe_checkpoint(path)


def test_wrong_shapes_are_named(tmp_path, tiny_unet):
    path = save_model(tmp_path / "teacher.safetensors", tiny_unet, {"model": {**tiny_unet.config, "nf": 32}})
    with pytest.raises(CheckpointError, match="does not fit the model — .*wrong shape: all_modules.0.bias"):
        describe_checkpoint(path)
    shapes = {k: tuple(v.shape) for k, v in tiny_unet.state_dict().items() if not k.startswith("all_modules.5.")}
    with pytest.raises(CheckpointError, match="do not follow the reference DDPM\\+\\+ layout"):
        ddpmpp_config_guess(shapes)  # one res-block missing


def test_pickled_code_needs_an_explicit_opt_in(tmp_path, tiny_unet):
    path = tmp_path / "with_args.pth"
    state = {f"module.{k}": v for k, v in tiny_unet.state_dict().items()}
    torch.save({"model": state, "args": argparse.Namespace(lr=2e-4)}, path)
    with pytest.raises(CheckpointError, match=r"pickles Python objects \(argparse.Namespace\).*unsafe_pickle=True"):
        describe_checkpoint(path)
    info = describe_checkpoint(path, unsafe_pickle=True)
    assert info["format"] == "reference-ddpmpp" and info["params"] == params(tiny_unet)
