"""`prune_network`: prune an existing classifier (timm / torchvision / a user's own class, with pretrained or
user weights), fine-tune it, measure it, and write the pruned model with a JSON report and a log.

Data come through an adapter passed in by the caller, `load_images(name, split=..., root=..., image_size=...)`
returning an object with `.images` (uint8 N×C×H×W) and `.labels` (int64), e.g. `slimflow.data.load_images`
for "fashion_mnist", "cifar10" (root) and "image_folder" (root); this package does not import it.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .dnr import DeadNeuronMonitor
from .measure import count_macs_params, measure_latency
from .models import create_model, describe, model_spec
from .recovery import classification_loss, evaluate_accuracy, fine_tune, image_batches
from .serialization import load_pruned, save_pruned
from .structured import IMPORTANCES, find_output_layers, prune_structured
from .taylor import accumulate_gradients
from .unstructured import WeightMasks, iterative_pruning, n_of_m_masks, snapshot

UNSTRUCTURED = ("magnitude", "ap")
SEMI_STRUCTURED = ("2:4",)  # n:m masks along the input dimension, one cut then recovery
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


class _Log:
    """Lines to `<out_dir>/log.txt` (appended) and to the console above the progress bar."""

    def __init__(self, path: Path, echo: bool):
        self.path, self.echo = path, echo
        self.started = time.time()

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.started:6.1f}s] {message}"
        with self.path.open("a") as f:
            f.write(line + "\n")
        if self.echo:
            tqdm.write(line)


def _rounded(latency_ms: dict) -> dict:
    return {batch: round(ms, 2) for batch, ms in latency_ms.items()}


def _check_forward(net: nn.Module, example: torch.Tensor, spec: Mapping) -> None:
    """One forward pass on the data's shape: a clear error before any pruning if the network does not fit."""
    was_training = net.training
    try:
        with torch.no_grad():
            out = net.eval()(example)
    except Exception as err:  # noqa: BLE001 - any failure here means the architecture does not fit the data
        hint = " (a timm ViT takes --model-kwargs img_size=... patch_size=...)" if spec["source"] == "timm" else ""
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise ValueError(
            f"{describe(spec)} cannot take inputs of shape {tuple(example.shape)}: {message}; pass model "
            f"arguments that fit the data{hint}"
        ) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != spec["num_classes"]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{describe(spec)} must return class scores of shape (batch, {spec['num_classes']}), got {got}; "
            f"build it for {spec['num_classes']} classes (e.g. --model-kwargs num_classes={spec['num_classes']})"
        )


@torch.no_grad()
def _reloads_identically(net: nn.Module, out_dir: Path, shape: tuple, device: torch.device, seed: int) -> bool:
    """Load the written directory back and compare outputs with `net` on random inputs: a file that would not
    reproduce the pruned network is an error here, not a surprise later."""
    probe = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    reloaded = load_pruned(out_dir, import_code=True).to(device).eval()
    was_training = net.training
    expected = net.eval()(probe)
    net.train(was_training)
    if not torch.equal(reloaded(probe), expected):
        raise RuntimeError(
            f"{out_dir} does not reproduce the pruned network (max abs diff "
            f"{(reloaded(probe) - expected).abs().max().item():.3g}); please report this with pruning.json"
        )
    return True


def prune_network(
    *,
    model: str,
    out_dir: str | Path,
    load_images: Callable[..., Any],
    dataset: str = "fashion_mnist",
    data_root: str | None = None,
    image_size: int = 32,
    num_classes: int | None = None,
    model_kwargs: Mapping | None = None,
    checkpoint: str | None = None,
    pretrained: bool | str = False,
    random_init: bool = False,
    method: str = "l2",
    ratio: float = 0.5,
    sparsity: float = 0.9,
    steps: int = 1,
    global_pruning: bool = False,
    round_to: int | None = None,
    head_ratio: float = 0.0,
    prune_head_dims: bool = True,
    unwrapped_parameters: Mapping[str, int] | None = None,
    ap_fraction: float = 0.1,
    finetune_epochs: float = 1.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    max_train_images: int | None = None,
    max_eval_images: int | None = None,
    latency_batch_size: int = 64,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Prune `model` ("timm:<name>", "torchvision:<name>", "package.module:Class" or "file.py:Class", built with
    `model_kwargs`), fine-tune after every step, write `out_dir`.

    Weights: `checkpoint` (yours), `pretrained` (True: the local caches; a path), or `random_init=True` to prune a
    randomly initialised network on purpose; with none of them it refuses (pruning random weights is rarely meant).

    method: a structural importance (l1, l2, taylor, lamp, random; `ratio` = share of channels removed) or
    unstructured "magnitude" / "ap" (`sparsity` = final share of zero weights, reached over `steps` cycles
    after one initial fine-tune phase that gives AP its reference change; `ap_fraction` = AP share of each cut),
    or "2:4" (two of every four weights along each layer's input kept, by magnitude; one cut, one recovery phase).
    Output layers are never pruned. Attention (timm-style) loses whole heads at `head_ratio` and head dimensions
    unless `prune_head_dims` is False; `unwrapped_parameters` ({name: dim}) overrides the channel dimension guessed
    for parameters outside layers (a ViT's cls_token, pos_embed). `finetune_epochs` (may be fractional) is the
    recovery per step, Adam at `lr` with cosine decay. Writes model.safetensors, pruning.json (masks.safetensors),
    report.json and log.txt; returns the report (params, MACs, latency in ms at batch 1 and `latency_batch_size` (0:
    batch 1 only), accuracy, DNR, timing). `progress` shows a progress bar and echoes the log.
    """
    if not (checkpoint or pretrained or random_init):
        raise ValueError(
            f"no weights for {model}: give a checkpoint (your weights), pretrained weights, or random_init=True "
            f"(CLI: --random-init) to prune a randomly initialised network on purpose"
        )
    if random_init and (checkpoint or pretrained):
        raise ValueError("random_init=True contradicts the checkpoint / pretrained weights given")
    if latency_batch_size < 0:
        raise ValueError(f"latency_batch_size must be >= 0 (0: batch 1 only), got {latency_batch_size}")
    methods = IMPORTANCES + UNSTRUCTURED + SEMI_STRUCTURED
    if method not in methods:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(methods)}")
    if method in UNSTRUCTURED and not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    try:  # the output folder must be usable before any pruning or fine-tuning is done
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output folder {str(out_dir)!r} ({err.strerror or err})") from None
    started = time.time()
    log = _Log(Path(out_dir) / "log.txt", echo=progress)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_images(dataset, split="train", root=data_root, image_size=image_size)
    test = load_images(dataset, split="test", root=data_root, image_size=image_size)
    train_x, train_y = _subset(train.images, train.labels, max_train_images, generator)
    test_x, test_y = _subset(test.images, test.labels, max_eval_images, generator)
    num_classes = num_classes or int(train.labels.max()) + 1
    in_chans = 3 if model.startswith("torchvision:") else train_x.shape[1]
    spec = model_spec(model, num_classes=num_classes, in_chans=in_chans, kwargs=model_kwargs)
    net = create_model(spec, pretrained=pretrained, checkpoint=checkpoint, import_code=True).to(device)
    weights = checkpoint or (pretrained if isinstance(pretrained, str) else "pretrained" if pretrained else "random")
    log(
        f"{describe(spec)} {dict(spec['kwargs'])} weights: {weights}; {dataset}: {len(train_x)} train, "
        f"{len(test_x)} test images of {tuple(train_x.shape[1:])}"
    )

    shape = (in_chans, *train_x.shape[2:])
    example = torch.zeros(1, *shape, device=device)
    _check_forward(net, example, spec)
    latency_inputs = {b: torch.randn(b, *shape, device=device) for b in sorted({1, latency_batch_size} - {0})}
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
    n_phases = 1 if method in SEMI_STRUCTURED else steps + (1 if method in UNSTRUCTURED else 0)
    bar = tqdm(total=n_phases * phase_steps, desc="fine-tune", unit="step", disable=not progress, dynamic_ncols=True)

    def recover(masks: WeightMasks | None = None) -> None:
        entry = {"accuracy_before": accuracy()}
        monitor = DeadNeuronMonitor(net) if _has_activations(net) else None

        def on_step(_m: nn.Module, _step: int, loss: float) -> None:
            bar.set_postfix(phase=f"{len(phases) + 1}/{n_phases}", loss=f"{loss:.3f}", refresh=False)
            bar.update()

        losses = fine_tune(net, classification_loss, batches, steps=phase_steps, lr=lr, masks=masks, on_step=on_step)
        if monitor is not None:
            entry["dnr_train"] = monitor.rates()["overall"]
            monitor.close()
        entry.update(steps=phase_steps, final_loss=losses[-1], accuracy_after=accuracy())
        if masks is not None:
            entry["sparsity"] = masks.sparsity()
        phases.append(entry)
        widths = f", sparsity {entry['sparsity']:.3f}" if masks is not None else ""
        log(
            f"phase {len(phases)}/{n_phases}: {phase_steps} steps, loss {losses[-1]:.4f}, accuracy "
            f"{entry['accuracy_before']:.4f} -> {entry['accuracy_after']:.4f}{widths}"
        )

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
    }
    log("measuring the unpruned network (MACs, params, latency, accuracy)")
    report["before"] = {**cost(), "accuracy": accuracy()}
    log(
        f"before: {report['before']['params']:,} params, {report['before']['macs']:,} MACs, accuracy "
        f"{report['before']['accuracy']:.4f}"
    )
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
            head_ratio=head_ratio,
            prune_head_dims=prune_head_dims,
            unwrapped_parameters=dict(unwrapped_parameters or {}),
            compute_gradients=gradients if method == "taylor" else None,
            after_step=lambda _m, _r: recover(),
        )
        history = result.pop("history")
        report["structured"] = result
    elif method in SEMI_STRUCTURED:
        n, m = (int(k) for k in method.split(":"))
        masks, dense = n_of_m_masks(net, n, m, ignored_layers=find_output_layers(net, example))
        masks.apply(net)
        recover(masks)
        report["semi_structured"] = {"pattern": method, "sparsity": masks.sparsity(), "dense_layers": dense}
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
    bar.close()
    report["phases"] = phases
    report["after"] = {**cost(), "accuracy": phases[-1]["accuracy_after"]}
    log(
        f"after: {report['after']['params']:,} params, {report['after']['macs']:,} MACs, accuracy "
        f"{report['after']['accuracy']:.4f}; latency ms (batch: ms) {_rounded(report['before']['latency_ms'])} -> "
        f"{_rounded(report['after']['latency_ms'])}"
    )
    report["seconds"] = time.time() - started
    out_dir = Path(out_dir)
    save_pruned(
        out_dir,
        net,
        arch=spec,
        example_inputs=example,
        history=history,
        masks=masks,
        unwrapped_parameters=report.get("structured", {}).get("unwrapped_parameters"),
        extra={"method": method, "report": "report.json"},
    )
    report["reloaded_identical"] = _reloads_identically(net, out_dir, shape, device, seed)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    log(f"wrote {out_dir / 'model.safetensors'}, pruning.json, report.json ({report['seconds']:.0f} s)")
    return report
