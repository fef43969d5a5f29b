"""Losses and distances. Every function takes (B, ...) tensors and returns per-sample values of shape (B,);
callers take the mean (or weight the samples first).

- `l2`, `l1`: mean over the elements of a sample of the squared / absolute error.
- `pseudo_huber`: sqrt(‖e‖² + c²) − c on the whole sample's error e (docs/methods.md, "Losses and distances"; c = 0.00054·√d).
- perceptual distances (`make_perceptual`): LPIPS on the `lpips` package's VGG16 / AlexNet (needs torchvision's
  ImageNet backbone weights on disk; nothing is downloaded), or "domain", the LPIPS-style distance on the
  project's Fashion-MNIST classifier (slimflow.domain_net), which works offline.
- `lpips_huber`: the rfpp LPIPS–Huber training loss.
- `distance(kind)`: any of the two-image distances above as `d(x, y) -> (B,)` (D of docs/methods.md, "Flow-guided distillation").
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from slimflow.checkpoint import CheckpointError, load_torch_file
from slimflow.domain_net import DomainNet, MissingWeightsError, load_domain_net

HUBER_C_PER_SQRT_DIM = 0.00054  # rfpp: c = 0.00054·√d (their code's 0.00054·d is a known bug)
MIN_DATA_TIME = 1e-5  # floor on t' = 1 − t when the LPIPS term is divided by t' (rfpp clamps t to [1e-5, 1 − 1e-5])
LPIPS_NETS = {"lpips-vgg": ("vgg", "vgg16"), "lpips-alex": ("alex", "alexnet")}  # kind: (lpips net, torchvision arch)
PERCEPTUAL_KINDS = (*LPIPS_NETS, "domain")
PIXEL_KINDS = ("l2", "l1", "pseudo_huber")
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.ndim < 2:
        raise ValueError(
            f"expected two tensors of the same shape (B, ...), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


# ------------------------------------------------------------------------------------------------ pixel losses
def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, (B,)."""
    _check_pair(pred, target)
    return (pred - target).square().flatten(1).mean(1)


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each sample, (B,)."""
    _check_pair(pred, target)
    return (pred - target).abs().flatten(1).mean(1)


def huber_c(d: int) -> float:
    """rfpp's pseudo-Huber constant for samples of d elements: 0.00054·√d (≈ 0.03 for 3×32×32)."""
    return HUBER_C_PER_SQRT_DIM * math.sqrt(d)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sqrt(‖e‖² + c²) − c per sample, e = pred − target over all its elements, (B,); c defaults to huber_c(d).

    Limits: ≈ ‖e‖²/(2c) when ‖e‖ ≪ c (a scaled L2), ≈ ‖e‖ − c when ‖e‖ ≫ c (an unsquared L2 norm, so large
    errors get gradients of unit norm). Note the scale: a sum over elements, unlike `l2`'s mean."""
    _check_pair(pred, target)
    c = huber_c(pred[0].numel()) if c is None else c
    if c <= 0:
        raise ValueError(
            f"pseudo-Huber c must be > 0 (c = 0 is the plain norm, not differentiable at zero error), got {c}"
        )
    squared_norm = (pred - target).square().flatten(1).sum(1)
    return torch.sqrt(squared_norm + c * c) - c


# ------------------------------------------------------------------------------------------------ perceptual
class FrozenDistance(nn.Module):
    """A distance with a fixed network: parameters frozen, always in eval mode (a parent's .train() keeps BN
    statistics and dropout off). Gradients still flow to the inputs."""

    def train(self, mode: bool = True) -> FrozenDistance:
        return super().train(False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()


def pretrained_file_location(filename: str, given: str | Path | None, given_label: str) -> tuple[Path, str]:
    """(path, where it comes from) of a pretrained weights file: `given` if set, else the torch hub cache
    (`torch.hub.get_dir()/checkpoints/<filename>`, which follows $TORCH_HOME). Nothing is downloaded."""
    if given is not None:
        return Path(given), f"the given {given_label}"
    return Path(torch.hub.get_dir()) / "checkpoints" / filename, "the torch hub cache"


def lpips_backbone_file(kind: str, backbone_path: str | Path | None = None) -> Path:
    """The torchvision ImageNet weights file an LPIPS kind needs: `backbone_path` if given, else the torch hub
    cache (`torch.hub.get_dir()/checkpoints/<torchvision file name>`). MissingWeightsError when it is absent."""
    arch = LPIPS_NETS[kind][1]
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    filename = os.path.basename(weights.url)
    path, where = pretrained_file_location(filename, backbone_path, "backbone_path")
    if path.is_file():
        return path
    raise MissingWeightsError(
        f"perceptual {kind!r} needs torchvision's ImageNet {arch} weights {filename!r}, not found at {str(path)!r} "
        f"({where}; nothing is downloaded here). On a machine with internet run\n"
        f"  python -c \"import torchvision; torchvision.models.{arch}(weights='IMAGENET1K_V1')\"\n"
        f"(or fetch {weights.url}) and copy the file to {str(path)!r} (the hub cache follows $TORCH_HOME), or pass "
        f"its location as backbone_path. Offline alternative for Fashion-MNIST: `perceptual: domain` in the config."
    )


def _read_backbone(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_torch_file(path)
    except CheckpointError as err:
        raise CheckpointError(
            f"LPIPS backbone {str(path)!r} cannot be read ({err}); the file is corrupt or "
            "not a torchvision weights file — fetch it again"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"LPIPS backbone {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def _load_backbone(trunk: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy torchvision's `features.<i>.*` tensors into lpips' trunk, whose tensors are `slice<k>.<i>.*`."""
    own = trunk.state_dict()
    source = {name: "features." + name.split(".", 1)[1] for name in own}
    bad = [
        f"{src} (file {tuple(state[src].shape) if src in state else 'missing'}, needs {tuple(own[name].shape)})"
        for name, src in source.items()
        if src not in state or state[src].shape != own[name].shape
    ]
    if bad:
        raise CheckpointError(
            f"LPIPS backbone {str(path)!r} does not fit the {type(trunk).__name__} trunk: " + ", ".join(bad[:6])
        )
    trunk.load_state_dict({name: state[src] for name, src in source.items()})


class LpipsDistance(FrozenDistance):
    """LPIPS (v0.1, the package's calibrated linear layers) on a VGG16 or AlexNet trunk loaded from a local file.

    Inputs in [-1, 1]; one channel is repeated to three; both images are resized bilinearly to size×size first
    (None keeps their size)."""

    def __init__(self, kind: str, size: int | None = 224, backbone_path: str | Path | None = None):
        super().__init__()
        path = lpips_backbone_file(kind, backbone_path)
        state = _read_backbone(path)
        import lpips

        with warnings.catch_warnings():  # lpips builds its trunk through torchvision's deprecated `pretrained=`
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            # pnet_rand: build the trunk without weights (so torchvision never downloads); filled from `path`
            self.lpips = lpips.LPIPS(net=LPIPS_NETS[kind][0], pretrained=True, pnet_rand=True, verbose=False)
        _load_backbone(self.lpips.net, state, path)
        self.size = size
        self._freeze()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.size is not None and x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        return self.lpips(self._prepare(x), self._prepare(y)).flatten()


class DomainDistance(FrozenDistance):
    """LPIPS-style distance on the domain net: at every stage's feature map, unit-normalise each position's
    channel vector, take the squared difference summed over channels and averaged over space; the result is the
    uniform mean over stages (no learned weights), so it lies in [0, 4].

    Inputs (B, 1, H, W) in [-1, 1]; other sizes are resized bilinearly to the net's resolution (32)."""

    def __init__(self, net: DomainNet):
        super().__init__()
        self.net = net
        self._freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        size = self.net.config["resolution"]
        both = torch.cat([x, y])
        if both.ndim == 4 and both.shape[-2:] != (size, size):
            both = F.interpolate(both, size=(size, size), mode="bilinear", align_corners=False)
        per_stage = []
        for fmap in self.net.feature_maps(both):
            unit = F.normalize(fmap, dim=1, eps=1e-10)
            per_stage.append((unit[: x.shape[0]] - unit[x.shape[0] :]).square().sum(1).mean((1, 2)))
        return torch.stack(per_stage).mean(0)


def make_perceptual(
    kind: str,
    *,
    size: int | None = 224,
    backbone_path: str | Path | None = None,
    weights_path: str | Path | None = None,
) -> FrozenDistance:
    """A frozen perceptual distance module `d(x, y) -> (B,)` for images in [-1, 1] (on the CPU; move it with .to).

    kind "lpips-vgg" / "lpips-alex": `size` is the side both images are resized to (224 as in rfpp; SlimFlow's
    reference used 64); `backbone_path` the torchvision weights file (default: the torch hub cache).
    kind "domain": `weights_path` the domain-net file (default: the committed one).
    Missing weights raise MissingWeightsError naming the file."""
    if kind in LPIPS_NETS:
        return LpipsDistance(kind, size=size, backbone_path=backbone_path)
    if kind == "domain":
        return DomainDistance(load_domain_net(weights_path))
    raise ValueError(f"unknown perceptual distance {kind!r}; choose one of {PERCEPTUAL_KINDS}")


# ------------------------------------------------------------------------------------------------ combined
def lpips_huber(
    pred_clean: torch.Tensor,
    target_clean: torch.Tensor,
    pred_v: torch.Tensor,
    target_v: torch.Tensor,
    t: torch.Tensor,
    perceptual: Distance,
    one_over_t: bool = False,
    c: float | None = None,
) -> torch.Tensor:
    """rfpp's LPIPS–Huber loss per sample, (B,), in this project's time (t = 1 is data):

        L = t · pseudo_huber(pred_v, target_v) + perceptual(pred_clean, target_clean) [/ t']

    t' = 1 − t is rfpp's time from data, so the Huber weight (1 − t') is t. The Huber term compares velocities
    (the network's v_θ(x_t, t) with v* = x − z), the perceptual term the clean image predicted from x_t,
    x̂ = x_t + (1 − t)·v_θ, with the data x. `one_over_t` divides the perceptual term by t', clamped below at
    MIN_DATA_TIME (so t = 1 gives a large finite weight, 1e5, instead of inf)."""
    if t.shape != (pred_v.shape[0],):
        raise ValueError(f"t must have shape (B,) = ({pred_v.shape[0]},), got {tuple(t.shape)}")
    if pred_clean.shape[0] != pred_v.shape[0]:
        raise ValueError(
            f"clean images ({pred_clean.shape[0]}) and velocities ({pred_v.shape[0]}) differ in batch size"
        )
    huber = pseudo_huber(pred_v, target_v, c)
    percept = perceptual(pred_clean, target_clean)
    if one_over_t:
        percept = percept / (1.0 - t).clamp_min(MIN_DATA_TIME)
    return t * huber + percept


def distance(kind: str, **options) -> Distance:
    """A distance `d(x, y) -> (B,)` by name: "l2", "l1", "pseudo_huber" (option c), or a perceptual kind
    "lpips-vgg", "lpips-alex", "domain" (options of make_perceptual)."""
    pixel = {"l2": l2, "l1": l1, "pseudo_huber": pseudo_huber}
    if kind in pixel:
        allowed = {"c"} if kind == "pseudo_huber" else set()
        if set(options) - allowed:
            raise ValueError(f"distance {kind!r} takes no option(s) {sorted(set(options) - allowed)}")
        return functools.partial(pixel[kind], **options) if options else pixel[kind]
    if kind in PERCEPTUAL_KINDS:
        return make_perceptual(kind, **options)
    raise ValueError(f"unknown distance {kind!r}; choose one of {PIXEL_KINDS + PERCEPTUAL_KINDS}")


def velocity_loss(kind: str) -> Callable:
    """loss_fn(model, batch) for the engine: mean over the batch of D(v_θ(x_t, t), v*) with a pixel distance."""
    d = distance(kind)

    def loss_fn(model, batch):
        labels = (batch["labels"],) if "labels" in batch else ()  # a class-conditional model's labels
        return d(model(batch["x_t"], batch["t"], *labels), batch["target"]).mean()

    return loss_fn
