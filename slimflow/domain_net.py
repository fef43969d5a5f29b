"""The project's Fashion-MNIST classifier ("domain net"): the offline feature network for the perceptual
distance `perceptual: domain` (slimflow.losses) and for FID (domain) in the benchmark.

A small VGG-style CNN on 1×32×32 images in [-1, 1]: stages of 3×3 conv–BN–ReLU layers (`depths[i]` layers of
`widths[i]` channels; default one layer at 32², two at 16², two at 8²), 2×2 max-pooling between stages, global
average pooling, a linear classifier.
- `feature_maps(x)`: the output of every stage (after its last ReLU, before pooling), finest first.
- `features(x)`: the globally averaged last stage, shape (B, widths[-1]) — the penultimate layer.

The committed weights (`assets/domain_net_fmnist.safetensors` + `.json` sidecar with the test accuracy, the
command that made them, the wall time and the date) come from `train_domain_net`.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from slimflow.checkpoint import CheckpointError, load_state_checked, read_model_file, save_model
from slimflow.data import load_images, to_float
from slimflow.engine import resolve_device

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "domain_net_fmnist.safetensors"
KIND = "domain_net_fmnist"
CONFIG_KEYS = ("in_channels", "resolution", "widths", "depths", "num_classes")
TRAIN_COMMAND_HINT = ("slimflow domain-net train (or python -c \"from slimflow.domain_net import train_domain_net; "
                      "train_domain_net('slimflow/assets/domain_net_fmnist.safetensors')\")")
MAX_SHIFT = 2  # pixels of random translation in training
EVAL_BATCH = 1000


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights a component needs are not on this machine (nothing is ever downloaded)."""


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DomainNet(nn.Module):
    """Fashion-MNIST classifier whose intermediate activations serve as domain features."""

    def __init__(self, in_channels: int = 1, resolution: int = 32, widths: list[int] | tuple[int, ...] = (32, 64, 128),
                 depths: list[int] | tuple[int, ...] = (1, 2, 2), num_classes: int = 10):
        super().__init__()
        if len(widths) != len(depths) or min(depths) < 1:
            raise ValueError(f"DomainNet needs one depth >= 1 per width, got widths {widths} and depths {depths}")
        self.config = {"in_channels": in_channels, "resolution": resolution, "widths": list(widths),
                       "depths": list(depths), "num_classes": num_classes}
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(cin, cout), *(_conv_bn_relu(cout, cout) for _ in range(depth - 1)))
            for cin, cout, depth in zip(chans, chans[1:], depths)
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"DomainNet expects images (B, {self.config['in_channels']}, H, W), "
                             f"got shape {tuple(x.shape)}")

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations of every stage, finest first: (B, widths[i], H/2^i, W/2^i)."""
        self._check_input(x)
        maps = []
        for i, stage in enumerate(self.stages):
            x = stage(F.max_pool2d(x, 2) if i else x)
            maps.append(x)
        return maps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer: the last stage averaged over space, (B, widths[-1])."""
        return self.feature_maps(x)[-1].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(x))


# ------------------------------------------------------------------------------------------------ loading
def load_domain_net(path: str | Path | None = None, device: str | torch.device | None = None) -> DomainNet:
    """The trained domain net (default: the committed weights), frozen and in eval mode.

    Raises MissingWeightsError when the file is absent and CheckpointError when it is corrupt (checksum,
    safetensors) or does not fit the architecture its sidecar describes."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise MissingWeightsError(
            f"domain-net weights {path.name!r} not found at {str(path)!r}. They are committed with the project "
            f"(slimflow/assets/); if yours are missing, restore them from git or retrain with {TRAIN_COMMAND_HINT}."
        )
    sidecar, state = read_model_file(path)
    if sidecar.get("kind") != KIND:
        raise CheckpointError(f"{str(path)!r} is not a domain net: its sidecar has kind {sidecar.get('kind')!r}, "
                              f"expected {KIND!r}")
    config = sidecar.get("model")
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r}: its sidecar has no 'model' architecture config")
    if set(config) != set(CONFIG_KEYS):
        raise CheckpointError(f"{str(path)!r}: its sidecar's model config has keys {sorted(config)}, "
                              f"a DomainNet needs {sorted(CONFIG_KEYS)}")
    try:
        model = DomainNet(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r}: its sidecar's model config {config} does not build a DomainNet "
                              f"({err})") from None
    load_state_checked(model, state, f"{str(path)!r}")
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


# ------------------------------------------------------------------------------------------------ training
def random_shift(x: torch.Tensor, max_shift: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own integer offset in [-max_shift, max_shift]² (uncovered pixels = fill)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left–right with probability ½, independently."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 accuracy of `model` on uint8 images (N, C, H, W) with int labels; model put in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = to_float(images[start:start + batch_size].to(device))
        correct += (model(x).argmax(1).cpu() == labels[start:start + batch_size]).sum().item()
    return correct / images.shape[0]


def train_domain_net(out_path: str | Path, epochs: int = 8, batch_size: int = 128, lr: float = 0.1,
                     weight_decay: float = 5e-4, seed: int = 0, data_root: str | Path | None = None,
                     widths: tuple[int, ...] = (32, 64, 128), depths: tuple[int, ...] = (1, 2, 2),
                     device: str = "auto") -> dict:
    """Train the domain net on the Fashion-MNIST train split (32×32, random flips and ±2-pixel shifts; SGD with
    Nesterov momentum, one-cycle learning rate), measure its test-split accuracy, and write `out_path`
    (.safetensors) plus its JSON sidecar atomically. Returns the sidecar's metadata."""
    started = time.time()
    dev = resolve_device(device)
    train = load_images("fashion_mnist", split="train", root=data_root, image_size=32)
    test = load_images("fashion_mnist", split="test", root=data_root, image_size=32)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainNet(in_channels=1, resolution=32, widths=widths, depths=depths, num_classes=10).to(dev)
    steps_per_epoch = math.ceil(train.images.shape[0] / batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(train.images.shape[0], generator=generator)
        loss_sum, correct = 0.0, 0
        for start in tqdm(range(0, order.numel(), batch_size), desc=f"domain net epoch {epoch + 1}/{epochs}",
                          leave=False):
            idx = order[start:start + batch_size]
            x = to_float(train.images[idx]).to(dev)
            x = random_shift(random_hflip(x, generator), MAX_SHIFT, -1.0, generator)
            y = train.labels[idx].to(dev)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * idx.numel()
            correct += (logits.argmax(1) == y).sum().item()
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / order.numel(),
                        "train_accuracy": correct / order.numel(), "elapsed_s": round(time.time() - started, 1)})
        tqdm.write(f"domain net epoch {epoch + 1}: loss {history[-1]['train_loss']:.4f} "
                   f"train acc {history[-1]['train_accuracy']:.4f} ({history[-1]['elapsed_s']} s)")
    test_accuracy = accuracy(model, test.images, test.labels)
    model.cpu()
    meta = {
        "kind": KIND,
        "model": model.config,
        "params": sum(p.numel() for p in model.parameters()),
        "test_accuracy": test_accuracy,
        "test_images": int(test.images.shape[0]),
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                  "optimizer": "SGD nesterov momentum 0.9, one-cycle lr", "augmentation": "hflip p=0.5, shift ±2 px",
                  "history": history},
        "call": (f"slimflow.domain_net.train_domain_net(out_path={str(out_path)!r}, epochs={epochs}, "
                 f"batch_size={batch_size}, lr={lr}, weight_decay={weight_decay}, seed={seed}, "
                 f"data_root={None if data_root is None else str(data_root)!r}, widths={tuple(widths)}, "
                 f"depths={tuple(depths)}, device={device!r})"),
        "command": shlex.join(sys.orig_argv),
        "wall_time_s": round(time.time() - started, 3),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": str(dev), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
    }
    save_model(out_path, model, meta)
    return meta
