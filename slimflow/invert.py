"""Inversion: images (t = 1) → noise (t = 0) by integrating a velocity field backwards, then regeneration.

RF-Solver (SPEC §4) inverts with the same second-order step as it samples, time reversed; Euler is the
first-order baseline. Both directions use the same solver and step count, so the round-trip error measures the
discretisation error of the pair (an exact solver would give back the images).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from slimflow.solvers import ODESolution, solve

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NFE_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2, "rf_solver": 2}


@torch.no_grad()
def invert(velocity: Velocity, images: torch.Tensor, method: str = "rf_solver", steps: int = 25) -> ODESolution:
    """Noise for `images` (B, ...) in [-1, 1]: solve dx/dt = v from t = 1 back to t = 0."""
    return solve(velocity, images, method=method, steps=steps, t_start=1.0, t_end=0.0)


@torch.no_grad()
def reconstruct(velocity: Velocity, noise: torch.Tensor, method: str = "rf_solver", steps: int = 25) -> ODESolution:
    """Images regenerated from `noise`: solve dx/dt = v from t = 0 to t = 1."""
    return solve(velocity, noise, method=method, steps=steps, t_start=0.0, t_end=1.0)


def round_trip(velocity: Velocity, images: torch.Tensor, method: str,
               steps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(noise, reconstruction, NFE of both directions) with the same method and steps each way."""
    inverted = invert(velocity, images, method, steps)
    rebuilt = reconstruct(velocity, inverted.x, method, steps)
    return inverted.x, rebuilt.x, inverted.nfe + rebuilt.nfe


def reconstruction_error_vs_nfe(
    velocity: Velocity,
    images: torch.Tensor,
    methods: Sequence[str] = ("euler", "rf_solver"),
    nfe_per_direction: Sequence[int] = (4, 8, 16, 32),
) -> list[dict]:
    """Rows {method, steps, nfe, mse}: round trip at equal NFE per direction for each method.

    `nfe` is the measured total of both directions; mse is the mean squared error over all elements.
    """
    for method in methods:
        if method not in NFE_PER_STEP:
            raise ValueError(f"method {method!r} has no fixed NFE per step; use one of {', '.join(NFE_PER_STEP)}")
    rows = []
    for budget in nfe_per_direction:
        for method in methods:
            steps, remainder = divmod(budget, NFE_PER_STEP[method])
            if steps < 1 or remainder:
                raise ValueError(f"an NFE budget of {budget} per direction is not a whole number of {method} steps "
                                 f"({NFE_PER_STEP[method]} NFE each)")
            _, rebuilt, nfe = round_trip(velocity, images, method, steps)
            mse = (rebuilt - images).double().pow(2).mean().item()
            rows.append({"method": method, "steps": steps, "nfe": nfe, "mse": mse})
    return rows


def load_image_batch(source: str | Path, shape: Sequence[int], n: int, split: str = "test") -> torch.Tensor:
    """The first `n` images of a folder or a named data set (slimflow.data), as float (n, C, H, W) in [-1, 1]."""
    from slimflow.data import LOADERS, load_images, to_float

    channels, height, width = shape
    if height != width:
        raise ValueError(f"image loaders give square images; the teacher expects {height}x{width}")
    if Path(source).is_dir():
        images = load_images("image_folder", split="train", root=source, image_size=height).images
    elif str(source) in LOADERS:
        images = load_images(str(source), split=split, image_size=height).images
    else:
        raise FileNotFoundError(f"images {str(source)!r}: neither a folder of images nor a data set name "
                                f"({', '.join(LOADERS)})")
    if images.shape[1] != channels:
        raise ValueError(f"images {str(source)!r} have {images.shape[1]} channel(s); the teacher expects {channels}")
    return to_float(images[:n])


def invert_images(
    teacher_path: str | Path,
    images: str | Path,
    method: str = "rf_solver",
    steps: int = 25,
    out_dir: str | Path = "runs/invert",
    n: int = 16,
    split: str = "test",
    nfe_per_direction: Sequence[int] = (4, 8, 16, 32),
    unsafe_pickle: bool = False,
    resolution: int | None = None,
    device: str = "auto",
) -> dict:
    """Invert `n` images with the teacher, regenerate them, and write to `out_dir`:
    originals.png, reconstructions.png, reconstruction_error.json / .csv (Euler vs RF-Solver at equal NFE).

    `images`: a folder of images or a data set name of slimflow.data (its `split`); `resolution` is needed only
    for reference DDPM++ checkpoints (see teachers.inspect.load_teacher).
    """
    from slimflow.engine import resolve_device
    from slimflow.images import save_grid
    from teachers.inspect import load_teacher

    teacher = load_teacher(teacher_path, unsafe_pickle=unsafe_pickle, resolution=resolution)
    shape = getattr(teacher, "sample_shape", None)
    if shape is None:
        raise ValueError(f"teacher {str(teacher_path)!r} does not record its sample shape (C, H, W)")
    target = resolve_device(device)
    teacher = teacher.to(target)
    x = load_image_batch(images, shape, n, split).to(target)
    _, rebuilt, nfe = round_trip(teacher, x, method, steps)
    table = reconstruction_error_vs_nfe(teacher, x, ("euler", "rf_solver"), nfe_per_direction)
    out = Path(out_dir)
    files = {"originals": save_grid(x.cpu(), out / "originals.png"),
             "reconstructions": save_grid(rebuilt.cpu(), out / "reconstructions.png"),
             "table_json": out / "reconstruction_error.json", "table_csv": out / "reconstruction_error.csv"}
    files["table_json"].write_text(json.dumps(table, indent=1) + "\n")
    with open(files["table_csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "steps", "nfe", "mse"])
        writer.writeheader()
        writer.writerows(table)
    return {"teacher": str(teacher_path), "images": str(images), "n": len(x), "method": method, "steps": steps,
            "nfe": nfe, "mse": (rebuilt - x).double().pow(2).mean().item(), "table": table,
            "files": {k: str(v) for k, v in files.items()}}
