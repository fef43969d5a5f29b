"""Recovery after pruning through one small callback interface.

A recovery objective is a `LossFn`: `loss_fn(model, batch) -> loss` (a scalar tensor, or a tuple whose first item
is the loss, as the slimflow engine's loss functions return). Batches are any iterable the loss understands:
`(images, labels)` for classifier fine-tuning, a dict of noise/data/t for flow distillation. The same pair drives
`fine_tune`, `accumulate_gradients` (Taylor importance) and the pruning loops, so classifiers and flow students
plug in the same way.

Structural pruning replaces Parameter objects: build optimizers (and EMA copies) after each pruning step, never
before. `fine_tune` builds its optimizer on every call for that reason.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .unstructured import WeightMasks

LossFn = Callable[[nn.Module, Any], Any]


def loss_value(output: Any) -> torch.Tensor:
    """The scalar loss out of a LossFn result (a tensor or a `(loss, extras)` tuple)."""
    loss = output[0] if isinstance(output, tuple) else output
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ValueError(f"a loss_fn must return a scalar tensor (or a tuple starting with one), got {type(loss)}")
    return loss


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of `model(images)` against integer `labels`; batch = (images, labels)."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def image_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    repeat: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    channels: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float images in [-1, 1], labels) batches from uint8 NCHW images; `repeat` cycles epochs forever.

    `channels=3` repeats single-channel images to three channels (grey data into an RGB network).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if channels is not None and images.shape[1] not in (1, channels):
        raise ValueError(f"cannot feed {images.shape[1]}-channel images to a {channels}-channel network")
    return _batches(images, labels, batch_size, shuffle, repeat, generator, device, channels)


def _batches(images, labels, batch_size, shuffle, repeat, generator, device, channels):
    while True:
        order = torch.randperm(len(images), generator=generator) if shuffle else torch.arange(len(images))
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            x = images[idx].to(device).float().div_(127.5).sub_(1.0)
            if channels is not None and x.shape[1] != channels:
                x = x.expand(-1, channels, -1, -1)
            yield x, labels[idx].to(device)
        if not repeat:
            return


def fine_tune(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable,
    *,
    steps: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    cosine: bool = True,
    masks: WeightMasks | None = None,
    on_step: Callable[[nn.Module, int, float], None] | None = None,
) -> list[float]:
    """Train `model` for `steps` batches of `batches` with a fresh optimizer; returns the losses.

    optimizer: "adam" or "sgd" (with `momentum`); `cosine` decays the learning rate to 0 over `steps`.
    `masks` keeps pruned weights exactly zero. `on_step(model, step, loss)` runs after
    every optimizer step (DNR logging, EMA updates, ...). The model is left in train mode.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}: use 'adam' or 'sgd'")
    model.train()
    handles = masks.enforce(model, opt) if masks is not None else []
    losses: list[float] = []
    try:
        for step, batch in enumerate(itertools.islice(batches, steps)):
            if cosine:
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            loss = loss_value(loss_fn(model, batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(model, step, losses[-1])
    finally:
        for handle in handles:
            handle.remove()
    if len(losses) < steps:
        raise ValueError(
            f"fine_tune asked for {steps} steps but the batches ran out after {len(losses)}; "
            f"pass an endless iterator (e.g. image_batches(..., repeat=True))"
        )
    return losses


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy in eval mode over all (images, labels) batches; restores the model's mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in batches:
        correct += (model(images).argmax(dim=1) == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluate_accuracy got no batches")
    return correct / total
