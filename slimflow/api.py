"""The public Python API: the workbench's main operations on modules and files, in one place.

    import slimflow
    model = slimflow.load("teachers/weights/fmnist_teacher.safetensors")
    images = slimflow.generate(model, n=16, steps=4)            # float (16, 1, 32, 32), about [-1, 1]
    summary = slimflow.run("run", "quickstart", out="runs/qs")   # any config stage, preset or file + overrides
    report = slimflow.export(model, "runs/export")               # ONNX + torch.export of the one-step generator
    scores = slimflow.fid(images, reference="fashion_mnist")     # FID/KID/precision-recall, domain features

Each is a thin call into the stage or library function named in its docstring; `slimflow/__init__.py` imports
them lazily, so `import slimflow` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimflow.config import load_config
from slimflow.data import to_uint8
from slimflow.sample import sample
from slimflow.stages import run_stage, stage
from slimflow.stages.export import FORMATS, export_model
from teachers.zoo import load_model


def load(path: str | Path, **kwargs) -> torch.nn.Module:
    """Any model file the workbench reads, as a velocity network v(x, t) (`teachers.zoo.load_model`)."""
    return load_model(path, **kwargs)


def generate(
    model: torch.nn.Module,
    n: int = 64,
    steps: int = 1,
    method: str = "euler",
    seed: int = 0,
    labels=None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """n images from the noise of (seed, 0..n-1): one step is the one-step generator (`slimflow.sample.sample`).
    A class-conditional model takes `labels` (a class, one per image, or None: class-balanced) and a classifier-free
    `guidance` scale (1: none)."""
    return sample(model, n, method=method, steps=steps, seed=seed, labels=labels, guidance=guidance)[0]


def make_config(stage_name: str, preset: str | Path | None = None, **overrides) -> dict:
    """The merged config of a stage: its defaults <- a preset or YAML file <- `key=value` overrides, where a
    nested key is written with `__` (`anneal__train__steps=100`)."""
    module, _ = stage(stage_name)
    update: dict = {}
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = update
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return load_config(module.DEFAULTS, preset, update=update)


def run(stage_name: str, preset: str | Path | None = None, **overrides) -> dict:
    """Run a config stage ("teacher", "pairs", "anneal", "distill", "run", "prune", "bench", "fid") as its command
    would, with `make_config(stage_name, preset, **overrides)`; returns its summary. `run("fid", None,
    protocol="fmnist-domain", samples="s.npz")` is `slimflow fid --protocol fmnist-domain --samples s.npz`."""
    _, fn = stage(stage_name)
    return run_stage(fn, make_config(stage_name, preset, **overrides), None)


def export(
    model: torch.nn.Module | str | Path,
    out_dir: str | Path,
    formats: tuple[str, ...] = FORMATS,
    **kwargs,
) -> dict:
    """ONNX / torch.export of the one-step generator of a module or model file (`slimflow.stages.export`)."""
    return export_model(model, out_dir, formats, **kwargs)


def fid(
    images: torch.Tensor,
    reference: str | dict | torch.Tensor = "fashion_mnist",
    extractor: str = "domain",
    n_reference: int | None = None,
    **kwargs,
) -> dict[str, float]:
    """FID, KID and precision/recall of images (float in [-1, 1] or uint8) against a data set name (its test split,
    the first `n_reference` images; all by default), a reference spec or reference images
    (`slimflow.metrics.compute_metrics`)."""
    from slimflow.metrics import compute_metrics

    if images.is_floating_point():
        images = to_uint8(images)
    if isinstance(reference, str):
        size = images.shape[-1]
        reference = {"name": reference, "split": "test", "root": None, "image_size": size, "n": n_reference}
    return compute_metrics(images, reference, extractor, progress=False, **kwargs)
