"""Unstructured (weight-level) pruning with masks: iterative magnitude pruning and AP (docs/methods.md, "Pruning").

Each cycle removes `rate` of the surviving Conv/Linear weights: a share `ap_fraction` of them by the AP rule
(among surviving *negative* weights, those whose change |w_end − w_start| over the last training phase was
smallest), the rest by magnitude (smallest |w|), ranked over all layers ("global"), within each ("layer"), or
over all layers by LAMP score ("lamp": Lee et al., ICLR 2021 — a weight's w² over the sum of w² of the surviving
weights of its layer at least as large; scale-free per layer, so a layer of small weights is not emptied, and the
largest weight of every layer scores 1 and stays).
Between cycles the caller trains (fine-tunes, or rewinds first with `rewind`) with the masks enforced.

`attach_masks` stores masks in the model as `weight_mask` buffers, so that they travel with its state dict (the
project's model files, checkpoints and EMA copies); `masks_of` reads them back.

`n_of_m_masks` makes semi-structured masks instead (2:4 — the pattern sparse tensor cores accelerate): in every
group of `m` consecutive weights along a layer's input dimension, the `n` largest in magnitude are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

SCOPES = ("global", "layer", "lamp")


def prunable_weights(model: nn.Module, ignored_layers: Sequence[nn.Module] = ()) -> dict[str, nn.Parameter]:
    """{"<module>.weight": weight} of every Conv/Linear layer not in ignored_layers, in module order."""
    ignored = {id(m) for layer in ignored_layers for m in layer.modules()}
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and id(m) not in ignored
    }


class WeightMasks:
    """Binary masks {weight name: bool tensor} that keep pruned weights exactly zero through training."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = {name: mask.bool() for name, mask in masks.items()}

    @classmethod
    def dense(cls, model: nn.Module, ignored_layers: Sequence[nn.Module] = ()) -> WeightMasks:
        """All-ones masks over the prunable weights of `model`."""
        weights = prunable_weights(model, ignored_layers)
        if not weights:
            raise ValueError(f"{type(model).__name__} has no Conv/Linear weights to prune (outside the ignored layers)")
        return cls({name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()})

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [name for name in self.masks if name not in params]
        if missing:
            raise ValueError(f"masks name weights the model does not have: {', '.join(missing[:5])}")
        for name, mask in self.masks.items():
            if params[name].shape != mask.shape:
                raise ValueError(f"mask {name} has shape {tuple(mask.shape)}, weight has {tuple(params[name].shape)}")
        return {name: params[name] for name in self.masks}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the masked weights in place."""
        for name, param in self._params(model).items():
            param.mul_(self.masks[name].to(param.device))

    def enforce(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list:
        """Mask gradients, and re-zero masked weights after every `optimizer.step()` (momentum, Adam moments and
        weight decay would otherwise move them). Returns handles; call `.remove()` on each when done."""
        self.apply(model)
        handles = []
        for name, param in self._params(model).items():
            mask = self.masks[name].to(param.device)
            handles.append(param.register_hook(lambda grad, mask=mask: grad * mask))
        if optimizer is not None:
            handles.append(optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: self.apply(model)))
        return handles

    @contextmanager
    def enforced(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Context manager form of `enforce`."""
        handles = self.enforce(model, optimizer)
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def alive(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def sparsity(self) -> float:
        """Share of masked-out weights over all masked layers."""
        return 1.0 - self.alive() / self.total()

    def layer_sparsity(self) -> dict[str, float]:
        return {name: 1.0 - m.float().mean().item() for name, m in self.masks.items()}

    def save(self, path: str | Path) -> None:
        save_file({name: m.to(torch.uint8).cpu().contiguous() for name, m in self.masks.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> WeightMasks:
        if not Path(path).is_file():
            raise FileNotFoundError(f"mask file {str(path)!r} does not exist")
        return cls({name: t.bool() for name, t in load_file(str(path)).items()})


MASK_BUFFER = "weight_mask"  # the buffer beside a masked weight (a module's `weight_mask`)


@torch.no_grad()
def attach_masks(model: nn.Module, masks: WeightMasks) -> None:
    """Keep `masks` in the model itself: a uint8 buffer `<module>.weight_mask` beside each masked weight, so the
    masks travel with its state dict (checkpoints, EMA copies, model files), then zero the masked weights.
    Replaces masks attached before."""
    params = masks._params(model)  # checks names and shapes
    modules = dict(model.named_modules())
    for name, mask in masks.masks.items():
        module = modules[name.rpartition(".")[0]]
        module.register_buffer(MASK_BUFFER, mask.to(device=params[name].device, dtype=torch.uint8).contiguous())
    masks.apply(model)


def masks_of(model: nn.Module) -> WeightMasks | None:
    """The masks attached to `model` by `attach_masks` (copies, as bool), or None when it has none."""
    found = {
        f"{name}.weight": module.get_buffer(MASK_BUFFER)
        for name, module in model.named_modules()
        if MASK_BUFFER in module._buffers and module._buffers[MASK_BUFFER] is not None
    }
    return WeightMasks(found) if found else None


def ones_masks(model: nn.Module, names: Sequence[str]) -> WeightMasks:
    """All-ones masks for the named weights (placeholders to attach before loading a state dict with masks)."""
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"masked weights the model does not have: {', '.join(missing[:5])}")
    return WeightMasks({name: torch.ones_like(params[name], dtype=torch.bool) for name in names})


def sparse_storage_bytes(model: nn.Module, masks: WeightMasks, value_bytes: int = 4) -> int:
    """Bytes to store `model`'s parameters with the masked weights in a simple sparse form: per masked layer a
    bitmask (one bit per weight) plus its surviving values; every other parameter dense (`value_bytes` each)."""
    masked = masks._params(model)
    total = 0
    for name, param in model.named_parameters():
        if name in masked:
            total += (param.numel() + 7) // 8 + int(masks.masks[name].sum()) * value_bytes
        else:
            total += param.numel() * value_bytes
    return total


@torch.no_grad()
def n_of_m_masks(
    model: nn.Module, n: int = 2, m: int = 4, *, ignored_layers: Sequence[nn.Module] = ()
) -> tuple[WeightMasks, list[str]]:
    """N:M masks of the Conv/Linear weights of `model` (not applied): along the input dimension (dim 1; for a
    convolution at every kernel position), each group of `m` consecutive weights keeps its `n` largest |w| (ties
    to the lower index). Layers whose input size is not a multiple of `m` (e.g. a 1- or 3-channel first
    convolution) are left dense and returned by name."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"need integers 0 < n < m for n:m sparsity, got {n}:{m}")
    masks, dense = {}, []
    for name, weight in prunable_weights(model, ignored_layers).items():
        if weight.shape[1] % m:
            dense.append(name)
            continue
        w = weight.detach().abs().movedim(1, -1)  # (out, *kernel, in)
        groups = w.reshape(*w.shape[:-1], w.shape[-1] // m, m)
        order = torch.argsort(-groups, dim=-1, stable=True)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
        masks[name] = keep.reshape(w.shape).movedim(-1, 1).contiguous()
    if not masks:
        raise ValueError(f"no Conv/Linear layer of the model has an input size divisible by {m}: nothing to mask")
    return WeightMasks(masks), dense


def _scopes(names: list[str], scope: str) -> list[list[str]]:
    """The sets of weights ranked together: all of them ("global") or each layer alone ("layer")."""
    if scope in ("global", "lamp"):
        return [names]
    if scope == "layer":
        return [[name] for name in names]
    raise ValueError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")


def _lowest(scores: dict[str, torch.Tensor], eligible: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Masks of the `count` lowest-scoring eligible entries over all given layers; ties broken by position, so
    exactly `count` are chosen."""
    names = list(scores)
    flat = torch.cat([scores[n].flatten().cpu() for n in names])
    candidates = torch.cat([eligible[n].flatten().cpu() for n in names]).nonzero().squeeze(1)
    if count > len(candidates):
        raise ValueError(f"asked to remove {count} weights but only {len(candidates)} are eligible")
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[candidates[torch.argsort(flat[candidates], stable=True)[:count]]] = True
    out, start = {}, 0
    for n in names:
        out[n] = chosen[start : start + scores[n].numel()].view_as(scores[n]).to(scores[n].device)
        start += scores[n].numel()
    return out


def lamp_scores(weight: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """LAMP score of each surviving weight of one layer: w_u² / Σ_{v ≥ u} w_v² over the surviving weights sorted by
    |w| (ties in position order); masked weights score inf."""
    squares = weight.detach().flatten().double().square()
    keep = alive.flatten()
    order = torch.argsort(torch.where(keep, squares, torch.inf), stable=True)
    sorted_sq = torch.where(keep[order], squares[order], 0.0)
    tail = sorted_sq.flip(0).cumsum(0).flip(0)  # sum of the weights at least as large
    scores = torch.full_like(squares, torch.inf)
    scores[order] = torch.where(keep[order], sorted_sq / tail.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)
    return scores.view_as(weight)


@torch.no_grad()
def prune_cycle(
    model: nn.Module,
    masks: WeightMasks,
    *,
    rate: float,
    ap_fraction: float = 0.0,
    start_weights: dict[str, torch.Tensor] | None = None,
    scope: str = "global",
) -> WeightMasks:
    """Remove `rate` of the surviving weights (ap_fraction of them by AP, the rest by magnitude); returns the new
    masks, already applied to the model.

    start_weights: the weights at the start of the last training phase (`snapshot(model)` taken then); needed
    when ap_fraction > 0.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate is the share of surviving weights to remove and must be in [0, 1), got {rate}")
    if not 0.0 <= ap_fraction <= 1.0:
        raise ValueError(
            f"ap_fraction is the AP share of each cycle's removals; it must be in [0, 1], got {ap_fraction}"
        )
    if ap_fraction > 0 and start_weights is None:
        raise ValueError("AP needs start_weights: snapshot(model) taken at the start of the last training phase")
    weights = {n: p.detach() for n, p in masks._params(model).items()}
    alive = {n: m.to(weights[n].device) for n, m in masks.masks.items()}
    for names in _scopes(list(alive), scope):
        total = round(rate * sum(int(alive[n].sum()) for n in names))
        n_ap = round(ap_fraction * total)
        rank = (lambda n: lamp_scores(weights[n], alive[n])) if scope == "lamp" else (lambda n: weights[n].abs())
        removed = _lowest({n: rank(n) for n in names}, alive, total - n_ap)
        alive.update({n: alive[n] & ~removed[n] for n in names})
        if n_ap:
            change = {n: (weights[n] - start_weights[n].to(weights[n].device)).abs() for n in names}
            removed = _lowest(change, {n: alive[n] & (weights[n] < 0) for n in names}, n_ap)
            alive.update({n: alive[n] & ~removed[n] for n in names})
    new_masks = WeightMasks(alive)
    new_masks.apply(model)
    return new_masks


def cycle_rate(sparsity_now: float, sparsity_target: float) -> float:
    """Share of the surviving weights to remove to go from one overall sparsity to a higher one."""
    if not 0.0 <= sparsity_now <= sparsity_target < 1.0:
        raise ValueError(f"need 0 <= current {sparsity_now} <= target {sparsity_target} < 1")
    return 1.0 - (1.0 - sparsity_target) / (1.0 - sparsity_now)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict (start weights for AP, or a rewinding point)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def rewind(model: nn.Module, state: dict[str, torch.Tensor], masks: WeightMasks) -> None:
    """Load `state` (initial or early weights) and re-apply the masks (lottery-ticket rewinding)."""
    model.load_state_dict(state)
    masks.apply(model)


def iterative_pruning(
    model: nn.Module,
    targets: Sequence[float],
    train: Callable[[nn.Module, WeightMasks], None],
    *,
    start_weights: dict[str, torch.Tensor],
    ap_fraction: float = 0.0,
    scope: str = "global",
    masks: WeightMasks | None = None,
    rewind_to: dict[str, torch.Tensor] | None = None,
    after_cycle: Callable[[nn.Module, WeightMasks, float], None] | None = None,
) -> WeightMasks:
    """Prune a trained model through increasing overall sparsities `targets`, training after every cut.

    `start_weights` are the weights the model had when its last training began (the AP reference point).
    Each cycle: prune to the target (AP share `ap_fraction`), optionally rewind to `rewind_to`, snapshot the
    start weights, `train(model, masks)` (which must enforce the masks, e.g. `fine_tune(..., masks=masks)`), then
    `after_cycle(model, masks, target)` (evaluation, logging). Returns the final masks.
    """
    masks = masks if masks is not None else WeightMasks.dense(model)
    for target in targets:
        masks = prune_cycle(
            model,
            masks,
            rate=cycle_rate(masks.sparsity(), target),
            ap_fraction=ap_fraction,
            start_weights=start_weights,
            scope=scope,
        )
        if rewind_to is not None:
            rewind(model, rewind_to, masks)
        start_weights = snapshot(model)
        train(model, masks)
        if after_cycle is not None:
            after_cycle(model, masks, target)
    return masks
