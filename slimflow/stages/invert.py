"""`slimflow invert`: map images to noise with a teacher and back, and compare RF-Solver with Euler at equal NFE
(the maths: slimflow.invert)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from slimflow.checkpoint import atomic_file, atomic_write_text, require_writable
from slimflow.data import LOADERS, load_images, to_float
from slimflow.engine import resolve_device
from slimflow.images import save_grid
from slimflow.invert import reconstruction_error_vs_nfe, round_trip
from slimflow.sample import conditioned, num_classes
from teachers.zoo import load_model


def load_image_batch(
    source: str | Path, shape: Sequence[int], n: int, split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `n` images of a folder or a named data set (slimflow.data), as float (n, C, H, W) in [-1, 1], and
    their labels (None for an unlabelled set)."""
    channels, height, width = shape
    if height != width:
        raise ValueError(f"image loaders give square images; the teacher expects {height}x{width}")
    if Path(source).is_dir():
        data = load_images("image_folder", split="train", root=source, image_size=height)
    elif str(source) in LOADERS:
        data = load_images(str(source), split=split, image_size=height)
    else:
        raise FileNotFoundError(
            f"images {str(source)!r}: neither a folder of images nor a data set name ({', '.join(LOADERS)})"
        )
    if data.images.shape[1] != channels:
        raise ValueError(
            f"images {str(source)!r} have {data.images.shape[1]} channel(s); the teacher expects {channels}"
        )
    return to_float(data.images[:n]), None if data.labels is None else data.labels[:n]


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
    for reference DDPM++ checkpoints (see teachers.zoo.load_model). A class-conditional teacher's ODE runs under
    each image's own label, so its images must be labelled (a data set with labels, or class sub-folders).
    """
    require_writable(out_dir)
    target = resolve_device(device)
    teacher = load_model(teacher_path, unsafe_pickle=unsafe_pickle, resolution=resolution, device=target)
    shape = teacher.sample_shape
    x, labels = load_image_batch(images, shape, n, split)
    x = x.to(target)
    if num_classes(teacher) and labels is None:
        raise ValueError(
            f"{str(teacher_path)!r} is class-conditional ({num_classes(teacher)} classes): it inverts images under "
            f"their labels, and {str(images)!r} has none (use a labelled data set or a folder of class sub-folders)"
        )
    velocity = conditioned(teacher, labels if num_classes(teacher) else None)
    _, rebuilt, nfe = round_trip(velocity, x, method, steps)
    table = reconstruction_error_vs_nfe(velocity, x, ("euler", "rf_solver"), nfe_per_direction)
    out = Path(out_dir)
    files = {
        "originals": save_grid(x.cpu(), out / "originals.png"),
        "reconstructions": save_grid(rebuilt.cpu(), out / "reconstructions.png"),
        "table_json": out / "reconstruction_error.json",
        "table_csv": out / "reconstruction_error.csv",
    }
    atomic_write_text(files["table_json"], json.dumps(table, indent=1) + "\n")
    with atomic_file(files["table_csv"]) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "steps", "nfe", "mse"])
        writer.writeheader()
        writer.writerows(table)
    return {
        "teacher": str(teacher_path),
        "images": str(images),
        "n": len(x),
        "method": method,
        "steps": steps,
        "nfe": nfe,
        "mse": (rebuilt - x).double().pow(2).mean().item(),
        "table": table,
        "files": {k: str(v) for k, v in files.items()},
    }
