"""`slimflow domain-net train`: train the Fashion-MNIST domain net (slimflow.domain_net) and write its weights."""

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

from slimflow.checkpoint import save_model
from slimflow.data import load_images, to_float
from slimflow.domain_net import KIND, DomainNet
from slimflow.engine import resolve_device
from slimflow.flow import random_hflip

MAX_SHIFT = 2  # pixels of random translation in training
EVAL_BATCH = 1000


def random_shift(x: torch.Tensor, max_shift: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own integer offset in [-max_shift, max_shift]² (uncovered pixels = fill)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows,
        cols,
    ]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 accuracy of `model` on uint8 images (N, C, H, W) with int labels; model put in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = to_float(images[start : start + batch_size].to(device))
        correct += (model(x).argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    return correct / images.shape[0]


def train_domain_net(
    out_path: str | Path,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    seed: int = 0,
    data_root: str | Path | None = None,
    widths: tuple[int, ...] = (32, 64, 128),
    depths: tuple[int, ...] = (1, 2, 2),
    device: str = "auto",
) -> dict:
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
        for start in tqdm(
            range(0, order.numel(), batch_size), desc=f"domain net epoch {epoch + 1}/{epochs}", leave=False
        ):
            idx = order[start : start + batch_size]
            x = to_float(train.images[idx]).to(dev)
            x = random_shift(random_hflip(x, generator)[0], MAX_SHIFT, -1.0, generator)
            y = train.labels[idx].to(dev)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * idx.numel()
            correct += (logits.argmax(1) == y).sum().item()
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / order.numel(),
                "train_accuracy": correct / order.numel(),
                "elapsed_s": round(time.time() - started, 1),
            }
        )
        tqdm.write(
            f"domain net epoch {epoch + 1}: loss {history[-1]['train_loss']:.4f} "
            f"train acc {history[-1]['train_accuracy']:.4f} ({history[-1]['elapsed_s']} s)"
        )
    test_accuracy = accuracy(model, test.images, test.labels)
    model.cpu()
    meta = {
        "kind": KIND,
        "model": model.config,
        "params": sum(p.numel() for p in model.parameters()),
        "test_accuracy": test_accuracy,
        "test_images": int(test.images.shape[0]),
        "train": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
            "optimizer": "SGD nesterov momentum 0.9, one-cycle lr",
            "augmentation": "hflip p=0.5, shift ±2 px",
            "history": history,
        },
        "call": (
            f"slimflow.domain_net.train_domain_net(out_path={str(out_path)!r}, epochs={epochs}, "
            f"batch_size={batch_size}, lr={lr}, weight_decay={weight_decay}, seed={seed}, "
            f"data_root={None if data_root is None else str(data_root)!r}, widths={tuple(widths)}, "
            f"depths={tuple(depths)}, device={device!r})"
        ),
        "command": shlex.join(sys.orig_argv),
        "wall_time_s": round(time.time() - started, 3),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "device": str(dev),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    save_model(out_path, model, meta)
    return meta
