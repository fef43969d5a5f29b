"""Inversion (images → noise) and regeneration; RF-Solver against Euler at equal NFE."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image
from torch import nn

from slimflow.data import sample_toy
from slimflow.flow import gaussian_rf_velocity, interpolate, sample_time, velocity_target
from slimflow.invert import invert, reconstruct, reconstruction_error_vs_nfe, round_trip
from slimflow.stages.invert import invert_images


class ToyVelocity(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


def train_toy_teacher(steps: int = 800) -> ToyVelocity:
    """A 1-RF teacher on two moons (~1.5 s on one core): loss ‖v(x_t, t) − (x − z)‖²."""
    generator = torch.Generator().manual_seed(0)
    model = ToyVelocity()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = sample_toy("moons", 256, generator)
        z = torch.randn(256, 2, generator=generator)
        t = sample_time(256, generator=generator)
        loss = (model(interpolate(z, x, t), t) - velocity_target(z, x)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def test_rf_solver_round_trip_beats_euler_at_equal_nfe_on_a_trained_teacher():
    teacher = train_toy_teacher()
    images = sample_toy("moons", 512, torch.Generator().manual_seed(1))
    rows = reconstruction_error_vs_nfe(teacher, images, ("euler", "rf_solver"), nfe_per_direction=(4, 8, 16))
    table = {(r["method"], r["nfe"]): r for r in rows}
    assert sorted(table) == [
        ("euler", 8),
        ("euler", 16),
        ("euler", 32),
        ("rf_solver", 8),
        ("rf_solver", 16),
        ("rf_solver", 32),
    ]
    for nfe in (8, 16, 32):
        assert table["rf_solver", nfe]["mse"] < 0.2 * table["euler", nfe]["mse"]
    assert table["rf_solver", 32]["mse"] < table["rf_solver", 16]["mse"] < table["rf_solver", 8]["mse"]
    assert table["euler", 32]["mse"] < table["euler", 8]["mse"]
    noise = invert(teacher, images, "rf_solver", 16).x  # the inverted data look like N(0, I)
    assert noise.mean(0).abs().max() < 0.2 and (noise.std(0) - 1).abs().max() < 0.2


def test_inversion_of_the_exact_gaussian_flow_recovers_the_noise():
    mean, std = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)
    field = lambda x, t: gaussian_rf_velocity(x, t, mean, std)  # noqa: E731
    z = torch.randn(256, 2, dtype=torch.float64)
    images = mean + std * z  # the exact flow maps z to μ + s·z
    inverted = invert(field, images, "rf_solver", 32)
    assert inverted.nfe == 64
    torch.testing.assert_close(inverted.x, z, rtol=0, atol=1e-3)
    torch.testing.assert_close(reconstruct(field, inverted.x, "rf_solver", 32).x, images, rtol=0, atol=2e-3)
    _, rebuilt, nfe = round_trip(field, images, "euler", 8)
    assert nfe == 16 and (rebuilt - images).abs().max() > 1e-3  # Euler's round trip is visibly inexact


def tiny_teacher_file(tmp_path):
    from slimflow.checkpoint import save_model
    from teachers.unet import build_unet

    config = {
        "in_channels": 1,
        "resolution": 8,
        "nf": 8,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
    }
    model = build_unet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return save_model(tmp_path / "teacher.safetensors", model, {"model": model.config, "kind": "test"})


def test_invert_images_writes_grids_and_the_error_table(tmp_path):
    teacher = tiny_teacher_file(tmp_path)
    out = tmp_path / "invert"
    summary = invert_images(
        teacher, "digits", method="rf_solver", steps=2, out_dir=out, n=6, nfe_per_direction=(2, 4), device="cpu"
    )
    assert summary["n"] == 6 and summary["nfe"] == 8 and summary["mse"] >= 0
    for name in ("originals", "reconstructions"):
        with Image.open(summary["files"][name]) as image:
            assert image.size == (2 + 6 * 10, 2 + 10)  # one row of six 8×8 tiles, 2-px padding
    rows = json.loads((out / "reconstruction_error.json").read_text())
    assert [(r["method"], r["nfe"]) for r in rows] == [("euler", 4), ("rf_solver", 4), ("euler", 8), ("rf_solver", 8)]
    with open(out / "reconstruction_error.csv") as handle:
        assert [r["method"] for r in csv.DictReader(handle)] == ["euler", "rf_solver", "euler", "rf_solver"]


def test_bad_inputs_raise_clear_errors(tmp_path):
    field = lambda x, t: -x  # noqa: E731
    with pytest.raises(ValueError, match="'dopri5' has no fixed NFE per step"):
        reconstruction_error_vs_nfe(field, torch.zeros(2, 2), ("dopri5",))
    with pytest.raises(ValueError, match="budget of 3 per direction is not a whole number of rf_solver steps"):
        reconstruction_error_vs_nfe(field, torch.zeros(2, 2), ("rf_solver",), (3,))
    teacher = tiny_teacher_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder of images nor a data set name"):
        invert_images(teacher, tmp_path / "no-such-images", out_dir=tmp_path / "o", device="cpu")
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(rgb / "a.png")
    with pytest.raises(ValueError, match="have 3 channel"):
        invert_images(teacher, rgb, out_dir=tmp_path / "o", device="cpu")
    with pytest.raises(FileNotFoundError, match="no model file or checkpoint"):
        invert_images(tmp_path / "missing.safetensors", "digits", out_dir=tmp_path / "o", device="cpu")
