"""`prune_network`: prune an existing classifier (timm / torchvision / user checkpoint), fine-tune it, measure it,
and write the pruned model with a JSON report.

Data come through an adapter passed in by the caller, `load_images(name, split=..., root=..., image_size=...)`
returning an object with `.images` (uint8 N×C×H×W) and `.labels` (int64), e.g. `slimflow.data.load_images`
for "fashion_mnist", "cifar10" (root) and "image_folder" (root); this package does not import it.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dnr import DeadNeuronMonitor
from .measure import count_macs_params, measure_latency
from .models import create_model, model_spec
from .recovery import classification_loss, evaluate_accuracy, fine_tune, image_batches
from .serialization import save_pruned
from .structured import IMPORTANCES, find_output_layers, prune_structured
from .taylor import accumulate_gradients
from .unstructured import WeightMasks, iterative_pruning, snapshot

UNSTRUCTURED = ("magnitude", "ap")
TAYLOR_BATCHES = 8  # training batches whose summed gradients score channels for method="taylor"


def _has_activations(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.ReLU, nn.SiLU, nn.GELU)) for m in model.modules())


def _subset(images: torch.Tensor, labels: torch.Tensor, limit: int | None, generator: torch.Generator):
    if labels is None:
        raise ValueError("the data set has no labels: classifier fine-tuning and accuracy need them")
    if limit is None or limit >= len(images):
        return images, labels
    idx = torch.randperm(len(images), generator=generator)[:limit]
    return images[idx], labels[idx]


def prune_network(
    *,
    model: str,
    out_dir: str | Path,
    load_images: Callable[..., Any],
    dataset: str = "fashion_mnist",
    data_root: str | None = None,
    image_size: int = 32,
    num_classes: int | None = None,
    checkpoint: str | None = None,
    pretrained: bool | str = False,
    method: str = "l2",
    ratio: float = 0.5,
    sparsity: float = 0.9,
    steps: int = 1,
    global_pruning: bool = False,
    round_to: int | None = None,
    ap_fraction: float = 0.1,
    finetune_epochs: float = 1.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    max_train_images: int | None = None,
    max_eval_images: int | None = None,
    latency_batch_size: int = 64,
    device: str | None = None,
    seed: int = 0,
) -> dict:
    """Prune `model` ("timm:<name>" / "torchvision:<name>"), fine-tune after every step, write `out_dir`.

    method: a structural importance (l1, l2, taylor, lamp, random; `ratio` = share of channels removed) or
    unstructured "magnitude" / "ap" (`sparsity` = final share of zero weights, reached over `steps` cycles
    after one initial fine-tune phase that gives AP its reference change; `ap_fraction` = AP share of each cut).
    Output layers are never pruned. `finetune_epochs` (may be fractional) is the recovery per step, Adam at
    `lr` with cosine decay. Writes model.safetensors, pruning.json (masks.safetensors), report.json; returns
    the report (params, MACs, latency in ms at batch 1 and `latency_batch_size`, accuracy, DNR, timing).
    """
    if method not in IMPORTANCES + UNSTRUCTURED:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(IMPORTANCES + UNSTRUCTURED)}")
    if method in UNSTRUCTURED and not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    try:  # the output folder must be usable before any pruning or fine-tuning is done
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output folder {str(out_dir)!r} ({err.strerror or err})") from None
    started = time.time()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_images(dataset, split="train", root=data_root, image_size=image_size)
    test = load_images(dataset, split="test", root=data_root, image_size=image_size)
    train_x, train_y = _subset(train.images, train.labels, max_train_images, generator)
    test_x, test_y = _subset(test.images, test.labels, max_eval_images, generator)
    num_classes = num_classes or int(train.labels.max()) + 1
    in_chans = 3 if model.startswith("torchvision:") else train_x.shape[1]
    spec = model_spec(model, num_classes=num_classes, in_chans=in_chans)
    net = create_model(spec, pretrained=pretrained, checkpoint=checkpoint).to(device)

    shape = (in_chans, *train_x.shape[2:])
    example = torch.zeros(1, *shape, device=device)
    latency_inputs = {
        1: torch.randn(1, *shape, device=device),
        latency_batch_size: torch.randn(latency_batch_size, *shape, device=device),
    }
    batches = image_batches(
        train_x, train_y, batch_size, repeat=True, generator=generator, device=device, channels=in_chans
    )
    phase_steps = max(1, math.ceil(finetune_epochs * len(train_x) / batch_size))

    def accuracy() -> float:
        return evaluate_accuracy(
            net, image_batches(test_x, test_y, 256, shuffle=False, device=device, channels=in_chans)
        )

    def cost() -> dict:
        macs, params = count_macs_params(net, example)
        return {
            "macs": macs,
            "params": params,
            "latency_ms": {str(b): measure_latency(net, x) for b, x in latency_inputs.items()},
        }

    phases: list[dict] = []

    def recover(masks: WeightMasks | None = None) -> None:
        entry = {"accuracy_before": accuracy()}
        monitor = DeadNeuronMonitor(net) if _has_activations(net) else None
        losses = fine_tune(net, classification_loss, batches, steps=phase_steps, lr=lr, masks=masks)
        if monitor is not None:
            entry["dnr_train"] = monitor.rates()["overall"]
            monitor.close()
        entry.update(steps=phase_steps, final_loss=losses[-1], accuracy_after=accuracy())
        if masks is not None:
            entry["sparsity"] = masks.sparsity()
        phases.append(entry)

    report: dict[str, Any] = {
        "model": spec,
        "method": method,
        "dataset": dataset,
        "image_size": image_size,
        "train_images": len(train_x),
        "eval_images": len(test_x),
        "seed": seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "before": {**cost(), "accuracy": accuracy()},
    }
    history: list = []
    masks = None
    if method in IMPORTANCES:

        def gradients(m: nn.Module) -> None:
            accumulate_gradients(m, classification_loss, itertools.islice(batches, TAYLOR_BATCHES), stop_ratio=None)

        result = prune_structured(
            net,
            example,
            importance=method,
            ratio=ratio,
            steps=steps,
            global_pruning=global_pruning,
            round_to=round_to,
            compute_gradients=gradients if method == "taylor" else None,
            after_step=lambda _m, _r: recover(),
        )
        history = result.pop("history")
        report["structured"] = result
    else:
        scope = "global" if global_pruning else "layer"
        masks = WeightMasks.dense(net, ignored_layers=find_output_layers(net, example))
        start = snapshot(net)
        recover()
        targets = [1.0 - (1.0 - sparsity) ** (k / steps) for k in range(1, steps + 1)]
        masks = iterative_pruning(
            net,
            targets,
            lambda _m, mk: recover(mk),
            start_weights=start,
            ap_fraction=ap_fraction if method == "ap" else 0.0,
            scope=scope,
            masks=masks,
        )
        report["unstructured"] = {
            "sparsity": masks.sparsity(),
            "targets": targets,
            "scope": scope,
            "ap_fraction": ap_fraction if method == "ap" else 0.0,
            "layer_sparsity": masks.layer_sparsity(),
        }
    report["phases"] = phases
    report["after"] = {**cost(), "accuracy": phases[-1]["accuracy_after"]}
    report["seconds"] = time.time() - started
    out_dir = Path(out_dir)
    save_pruned(
        out_dir,
        net,
        arch=spec,
        example_inputs=example,
        history=history,
        masks=masks,
        extra={"method": method, "report": "report.json"},
    )
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report
