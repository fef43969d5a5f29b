import argparse
import json
from pathlib import Path

import pytest
import torch

from slimflow.checkpoint import CheckpointError
from teachers.reference import load_reference_state_dict, reference_config_to_unet_config
from teachers.unet import PRESETS, build_unet

_FIXTURE_NAME = "ddpmpp_reference_shapes.json"
_FIXTURE_CANDIDATES = (Path(__file__).parent / "fixtures" / _FIXTURE_NAME,)


@pytest.fixture(scope="module")
def fixture() -> dict:
    """Reference NCSN++ (DDPM++) configs, parameter counts and state-dict shapes for five sizes."""
    for path in _FIXTURE_CANDIDATES:
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"reference shape fixture not found; looked at {[str(p) for p in _FIXTURE_CANDIDATES]}")


def unet_config(entry: dict) -> dict:
    config = entry["config"]
    return reference_config_to_unet_config(
        config["model"], image_size=config["image_size"], num_channels=config["num_channels"]
    )


def random_state_dict(entry: dict) -> dict[str, torch.Tensor]:
    return {key: torch.randn(shape) for key, shape in entry["state_dict_shapes"].items()}


@pytest.fixture
def small(fixture) -> tuple[dict, torch.nn.Module, dict[str, torch.Tensor]]:
    entry = fixture["3.4m"]
    return entry, build_unet(unet_config(entry)), random_state_dict(entry)


@pytest.mark.parametrize("size", ["61.8m", "27.9m", "15.7m", "7.0m", "3.4m"])
def test_reference_state_dict_loads_into_unet(fixture, size):
    entry = fixture[size]
    config = unet_config(entry)
    assert config == {**PRESETS[f"ddpmpp-{size}"], "time_scale": 999.0}
    model = build_unet(config)
    state_dict = random_state_dict(entry)
    assert load_reference_state_dict(state_dict, model) == "state_dict"
    loaded = model.state_dict()
    assert list(loaded) == [key for key in state_dict if key != "sigmas"]
    assert all(torch.equal(loaded[key], state_dict[key]) for key in loaded)
    if size in ("7.0m", "3.4m"):
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert model.eval()(x, torch.rand(2)).shape == x.shape


def test_wrapped_checkpoint_with_dataparallel_prefix_and_ema_shadow_params(small):
    _, model, state_dict = small
    ema_state = {key: value + 1.0 for key, value in state_dict.items() if key != "sigmas"}
    checkpoint = {
        "model": {f"module.{key}": value for key, value in state_dict.items()},
        "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": list(ema_state.values())},
        "optimizer": {"state": {}, "param_groups": []},
        "step": 10,
    }
    assert load_reference_state_dict(checkpoint, model) == "ema"
    assert all(torch.equal(model.state_dict()[key], value) for key, value in ema_state.items())
    assert load_reference_state_dict(checkpoint, model, weights="model") == "model"
    assert torch.equal(model.all_modules[0].weight, state_dict["all_modules.0.weight"])


def test_ema_entry_may_be_a_state_dict_and_model_only_checkpoints_load(small):
    _, model, state_dict = small
    assert load_reference_state_dict({"ema": state_dict}, model, weights="ema") == "ema"
    assert load_reference_state_dict({"model": state_dict, "step": 1}, model) == "model"
    with pytest.raises(ValueError, match="has no 'ema' entry"):
        load_reference_state_dict({"model": state_dict}, model, weights="ema")


def test_checkpoint_file_round_trip_and_pickle_needs_explicit_flag(small, tmp_path):
    _, model, state_dict = small
    plain = tmp_path / "plain.pth"
    torch.save({"model": state_dict, "step": 3}, plain)
    assert load_reference_state_dict(plain, model) == "model"

    pickled = tmp_path / "with_config.pth"
    torch.save({"model": state_dict, "config": argparse.Namespace(lr=2e-4)}, pickled)
    with pytest.raises(CheckpointError, match="pickles Python objects .*unsafe_pickle=True"):
        load_reference_state_dict(pickled, model)
    assert load_reference_state_dict(str(pickled), model, unsafe_pickle=True) == "model"


def test_missing_or_unreadable_file(small, tmp_path):
    _, model, _ = small
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_reference_state_dict(tmp_path / "nope.pth", model)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_reference_state_dict(junk, model)


def test_missing_extra_and_misshaped_keys_are_reported(small):
    _, model, state_dict = small
    before = {key: value.clone() for key, value in model.state_dict().items()}

    missing = {key: value for key, value in state_dict.items() if key != "all_modules.22.bias"}
    with pytest.raises(ValueError, match="missing keys \\(1\\): all_modules.22.bias"):
        load_reference_state_dict(missing, model)

    extra = {**state_dict, "all_modules.23.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="unexpected keys \\(1\\): all_modules.23.weight"):
        load_reference_state_dict(extra, model)

    misshaped = {**state_dict, "all_modules.2.weight": torch.zeros(64, 1, 3, 3)}
    with pytest.raises(ValueError, match="mis-shaped \\(1\\): all_modules.2.weight \\(64, 1, 3, 3\\) vs model"):
        load_reference_state_dict(misshaped, model)

    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_wrong_architecture_and_non_checkpoints_are_rejected(fixture, small):
    _, model, _ = small
    bigger = random_state_dict(fixture["7.0m"])
    with pytest.raises(ValueError, match="do not fit the model"):
        load_reference_state_dict(bigger, model)
    with pytest.raises(ValueError, match="'shadow_params' .* has 3 entries"):
        load_reference_state_dict({"ema": {"shadow_params": [torch.zeros(1)] * 3}}, model)
    with pytest.raises(ValueError, match="not a reference checkpoint"):
        load_reference_state_dict({"state": {}, "step": 1}, model)
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        load_reference_state_dict([torch.zeros(1)], model)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fir": True}, "fir=True"),
        ({"progressive": "output_skip"}, "progressive='output_skip'"),
        ({"progressive_input": "residual"}, "progressive_input='residual'"),
        ({"embedding_type": "fourier"}, "embedding_type='fourier'"),
        ({"resblock_type": "ddpm"}, "resblock_type='ddpm'"),
        ({"scale_by_sigma": True}, "scale_by_sigma=True"),
        ({"attention_type": "legacy"}, "attention_type='legacy'"),
        ({"new_option": 1}, "unknown option 'new_option'"),
    ],
)
def test_unsupported_reference_options_raise(fixture, change, message):
    model_config = {**fixture["3.4m"]["config"]["model"], **change}
    with pytest.raises(ValueError, match=message):
        reference_config_to_unet_config(model_config, image_size=32, num_channels=3)


def test_reference_config_needs_structural_keys(fixture):
    model_config = dict(fixture["3.4m"]["config"]["model"])
    del model_config["ch_mult"]
    with pytest.raises(ValueError, match="missing option 'ch_mult'"):
        reference_config_to_unet_config(model_config, image_size=32, num_channels=3)
