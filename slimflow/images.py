"""Writing images: grids (PNG) and sample sets (.npz), from float batches in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image


def grid_image(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> one (C, H', W') grid in [0, 1]."""
    return make_grid((images.detach().float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid_image(images, nrow), str(path))
    return path


def save_npz(images: torch.Tensor, path: str | Path) -> Path:
    """uint8 NHWC array `images`, the layout torch-fidelity and clean-fid read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez_compressed(path, images=array)
    return path
