"""Gradients for Taylor importance, accumulated from any loss over several batches (Diff-Pruning style).

Diff-Pruning sums the gradients of the denoising loss over timesteps and scores each channel by Σ|w·g| over
its weights (Torch-Pruning's GroupTaylorImportance); it stops adding timesteps once the loss drops below
`stop_ratio` × the largest loss seen (0.05), since the low-loss end contributes little information.
For a flow student, pass batches ordered by t and the flow-matching loss at that t; for a classifier, a few
training batches and cross-entropy (stop_ratio=None).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .recovery import LossFn, loss_value


def accumulate_gradients(
    model: nn.Module, loss_fn: LossFn, batches: Iterable, *, stop_ratio: float | None = 0.05
) -> list[float]:
    """Zero .grad, then backward `loss_fn(model, batch)` for each batch so .grad holds the sum; returns the losses.

    Stops after the first batch whose loss is below stop_ratio × max loss so far (None: use every batch).
    Runs in eval mode (no dropout, frozen norm statistics) and restores the model's mode.
    """
    if stop_ratio is not None and not 0.0 <= stop_ratio < 1.0:
        raise ValueError(f"stop_ratio must be in [0, 1) or None, got {stop_ratio}")
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    losses: list[float] = []
    try:
        for batch in batches:
            loss = loss_value(loss_fn(model, batch))
            loss.backward()
            losses.append(loss.item())
            if stop_ratio is not None and losses[-1] < stop_ratio * max(losses):
                break
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("accumulate_gradients got no batches")
    return losses
