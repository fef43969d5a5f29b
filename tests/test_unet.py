import json
import math
from pathlib import Path

import pytest
import torch

from teachers.unet import PRESETS, UNet, build_unet, timestep_embedding, variance_scaling_uniform_

_FIXTURE_NAME = "ddpmpp_reference_shapes.json"
_FIXTURE_CANDIDATES = (Path(__file__).parent / "fixtures" / _FIXTURE_NAME,)

# SlimFlow paper parameter counts (32×32, 3 channels).
PAPER_PARAMS = {
    "61.8m": 61.80e6,
    "27.9m": 27.906e6,
    "15.7m": 15.707e6,
    "7.0m": 6.990e6,
    "3.4m": 3.437e6,
}

TINY = {
    "in_channels": 1,
    "resolution": 16,
    "nf": 8,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}


def load_fixture() -> dict:
    for path in _FIXTURE_CANDIDATES:
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"reference shape fixture not found; looked at {[str(p) for p in _FIXTURE_CANDIDATES]}")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_fixture()


@pytest.mark.parametrize("size", list(PAPER_PARAMS))
def test_ddpmpp_preset_matches_reference_params_and_keys(fixture, size):
    model = build_unet(PRESETS[f"ddpmpp-{size}"])
    reference = fixture[size]
    assert n_params(model) == reference["params"]
    assert abs(n_params(model) - PAPER_PARAMS[size]) / PAPER_PARAMS[size] < 0.01
    ours = [(key, list(tensor.shape)) for key, tensor in model.state_dict().items()]
    theirs = [(key, shape) for key, shape in reference["state_dict_shapes"].items() if key != "sigmas"]
    assert ours == theirs


def test_ddpmpp_3_4m_at_64x64_has_spec_params():
    model = build_unet({**PRESETS["ddpmpp-3.4m"], "resolution": 64})
    assert n_params(model) == 3_536_195  # SlimFlow paper: 3.536M (attention at 16² now sits at the 128-channel level)


def test_fmnist_presets_sizes():
    teacher = n_params(build_unet(PRESETS["fmnist-teacher"]))
    students = ("fmnist-student-s", "fmnist-student-m", "fmnist-student-l")
    sizes = {name: n_params(build_unet(PRESETS[name])) for name in students}
    assert 0.1e6 <= sizes["fmnist-student-s"] <= 0.2e6
    assert 0.3e6 <= sizes["fmnist-student-m"] <= 0.4e6
    assert 0.45e6 <= sizes["fmnist-student-l"] <= 0.7e6
    assert sizes["fmnist-student-l"] < teacher / 2
    assert all(PRESETS[name]["in_channels"] == 1 and PRESETS[name]["resolution"] == 32 for name in sizes)


@pytest.mark.parametrize("name", ["fmnist-teacher", "fmnist-student-s"])
def test_fmnist_preset_forward_shape(name):
    model = build_unet(PRESETS[name])
    x = torch.randn(2, 1, 32, 32)
    assert model(x, torch.rand(2)).shape == x.shape


def test_output_shape_equals_input_shape_for_scalar_and_batched_time():
    model = UNet(**{**TINY, "in_channels": 3})
    x = torch.randn(3, 3, 16, 16)
    assert model(x, torch.rand(3)).shape == x.shape
    assert model(x, 0.5).shape == x.shape
    assert torch.equal(model(x, torch.tensor(0.25)), model(x, torch.full((3,), 0.25)))


def test_time_is_scaled_by_999_before_the_embedding():
    model = UNet(**TINY).eval()
    unscaled = UNet(**TINY, time_scale=1.0).eval()
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():  # make the time path matter: the zero-initialised output conv would hide it
        for net in (model, unscaled):
            net.all_modules[-1].weight.normal_(generator=torch.Generator().manual_seed(1))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.1, 0.7])
    assert model.config["time_scale"] == 999.0
    torch.testing.assert_close(model(x, t), unscaled(x, 999.0 * t))
    assert not torch.allclose(model(x, t), unscaled(x, t))


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0.0, 2.0]), 8)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    expected = torch.cat([torch.sin(2.0 * freqs), torch.cos(2.0 * freqs)])
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(4), torch.ones(4)]))
    torch.testing.assert_close(emb[1], expected)


def test_variance_scaling_init_bound_and_near_zero_last_layers():
    weight = variance_scaling_uniform_(torch.empty(256, 64))
    bound = math.sqrt(3.0 / ((256 + 64) / 2))
    assert weight.abs().max() <= bound
    assert abs(weight.std().item() - bound / math.sqrt(3.0)) < 0.02 * bound
    model = UNet(**TINY)
    last_conv = model.all_modules[-1]
    assert last_conv.weight.abs().max() < 1e-4 and torch.all(last_conv.bias == 0)
    assert model.all_modules[3].Conv_1.weight.abs().max() < 1e-4  # res-block output conv (init_scale 0)
    assert model(torch.randn(2, 1, 16, 16), torch.rand(2)).abs().max() < 1e-3


def test_config_is_json_and_rebuilds_same_architecture():
    model = UNet(**TINY)
    rebuilt = build_unet(json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    torch.testing.assert_close(rebuilt.eval()(x, t), model.eval()(x, t))


def test_every_parameter_gets_a_gradient():
    model = UNet(**TINY)
    model(torch.randn(2, 1, 16, 16), torch.rand(2)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_build_unet_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="unknown keys \\['channels'\\]"):
        build_unet({**TINY, "channels": 3})
    config = dict(TINY)
    del config["nf"]
    with pytest.raises(ValueError, match="missing keys \\['nf'\\]"):
        build_unet(config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attn_resolutions": [4]}, "attn_resolutions \\[4\\] are not among"),
        ({"resolution": 18, "ch_mult": [1, 2, 2]}, "divisible by 2\\*\\*\\(len\\(ch_mult\\) - 1\\) = 4"),
        ({"nf": 18}, "GroupNorm"),
        ({"nf": 7}, "even nf"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
    ],
)
def test_bad_architecture_arguments_raise(change, message):
    with pytest.raises(ValueError, match=message):
        UNet(**{**TINY, **change})


@pytest.mark.parametrize(
    ("x_shape", "t", "message"),
    [
        ((2, 3, 16, 16), torch.rand(2), "expects x of shape \\(B, 1, 16, 16\\)"),  # wrong input channels
        ((2, 1, 32, 32), torch.rand(2), "resolution=16"),
        ((1, 16, 16), torch.rand(1), "got \\(1, 16, 16\\)"),
        ((2, 1, 16, 16), torch.rand(3), "t of shape \\(2,\\)"),
        ((2, 1, 16, 16), torch.tensor([1, 0]), "float time"),
    ],
)
def test_bad_inputs_raise(x_shape, t, message):
    model = UNet(**TINY)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*x_shape), t)
