"""The project's Fashion-MNIST classifier ("domain net"): the offline feature network for the perceptual
distance `perceptual: domain` (slimflow.losses) and for FID (domain) in the benchmark.

A small VGG-style CNN on 1×32×32 images in [-1, 1]: stages of 3×3 conv–BN–ReLU layers (`depths[i]` layers of
`widths[i]` channels; default one layer at 32², two at 16², two at 8²), 2×2 max-pooling between stages, global
average pooling, a linear classifier.
- `feature_maps(x)`: the output of every stage (after its last ReLU, before pooling), finest first.
- `features(x)`: the globally averaged last stage, shape (B, widths[-1]) — the penultimate layer.

The committed weights (`assets/domain_net_fmnist.safetensors` + `.json` sidecar with the test accuracy, the
command that made them, the wall time and the date) come from `slimflow.stages.domain_net.train_domain_net`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimflow.checkpoint import CheckpointError, load_state_checked, read_model_file

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "domain_net_fmnist.safetensors"
KIND = "domain_net_fmnist"
CONFIG_KEYS = ("in_channels", "resolution", "widths", "depths", "num_classes")
TRAIN_COMMAND_HINT = (
    'slimflow domain-net train (or python -c "from slimflow.stages.domain_net import train_domain_net; '
    "train_domain_net('slimflow/assets/domain_net_fmnist.safetensors')\")"
)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights a component needs are not on this machine (nothing is ever downloaded)."""


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DomainNet(nn.Module):
    """Fashion-MNIST classifier whose intermediate activations serve as domain features."""

    def __init__(
        self,
        in_channels: int = 1,
        resolution: int = 32,
        widths: list[int] | tuple[int, ...] = (32, 64, 128),
        depths: list[int] | tuple[int, ...] = (1, 2, 2),
        num_classes: int = 10,
    ):
        super().__init__()
        if len(widths) != len(depths) or min(depths) < 1:
            raise ValueError(f"DomainNet needs one depth >= 1 per width, got widths {widths} and depths {depths}")
        self.config = {
            "in_channels": in_channels,
            "resolution": resolution,
            "widths": list(widths),
            "depths": list(depths),
            "num_classes": num_classes,
        }
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(cin, cout), *(_conv_bn_relu(cout, cout) for _ in range(depth - 1)))
            for cin, cout, depth in zip(chans, chans[1:], depths)
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(
                f"DomainNet expects images (B, {self.config['in_channels']}, H, W), got shape {tuple(x.shape)}"
            )

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
        raise CheckpointError(
            f"{str(path)!r} is not a domain net: its sidecar has kind {sidecar.get('kind')!r}, expected {KIND!r}"
        )
    config = sidecar.get("model")
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r}: its sidecar has no 'model' architecture config")
    if set(config) != set(CONFIG_KEYS):
        raise CheckpointError(
            f"{str(path)!r}: its sidecar's model config has keys {sorted(config)}, "
            f"a DomainNet needs {sorted(CONFIG_KEYS)}"
        )
    try:
        model = DomainNet(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{str(path)!r}: its sidecar's model config {config} does not build a DomainNet ({err})"
        ) from None
    load_state_checked(model, state, f"{str(path)!r}")
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model
