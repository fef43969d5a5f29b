"""Train a 1-rectified-flow teacher on an image data set (docs/methods.md, "Teacher")."""

from __future__ import annotations

import copy

import torch

from slimflow.checkpoint import require_writable
from slimflow.config import prefixed
from slimflow.data import load_images, to_float
from slimflow.engine import TRAIN_DEFAULTS, TRAIN_HELP, batch_indices, check_train_config
from slimflow.flow import flow_matching_batch, random_hflip, sample_time
from slimflow.losses import velocity_loss
from slimflow.sample import sample
from slimflow.stages.runner import TrainingJob, full_config, run_training
from teachers.unet import NO_LABEL
from teachers.zoo import build_model, resolve_model_config

DEFAULTS: dict = {
    "out": "runs/teacher",
    "data": {"name": "fashion_mnist", "root": None, "image_size": 32, "hflip": True},
    "model": {"_open": True, "preset": "fmnist-teacher"},
    "flow": {"time_sampler": "uniform", "eps": 1e-3, "a": 4.0, "loss": "l2", "label_dropout": 0.0},
    "train": copy.deepcopy(TRAIN_DEFAULTS),
    "sample": {"n": 64, "method": "euler", "steps": 100, "seed": 0},
}

HELP: dict[str, str] = {  # what each setting means (`--help-config`; tests/test_help_config.py checks all have one)
    "out": "run directory: config.yaml, checkpoints/, tb/, samples/, teacher_ema.safetensors, summary.json",
    "data.name": "training image set: fashion_mnist | cifar10 | image_folder | digits",
    "data.root": "folder of the data set (null: the default location)",
    "data.image_size": "images are resized to this many pixels a side",
    "data.hflip": "random horizontal flips of the training images",
    "model": "the velocity network: a preset of teachers.zoo and/or UNet settings (nf, ch_mult, ...)",
    "model.preset": "named architecture of teachers.zoo (its settings can be overridden next to it)",
    "flow.time_sampler": "training times: uniform on [eps, 1] | u_shaped (density ∝ cosh(a(t − ½))) | logit_normal",
    "flow.eps": "smallest training time of the uniform sampler",
    "flow.a": "steepness of the u_shaped time density",
    "flow.loss": "distance between predicted and target velocities: l2 | l1 | pseudo_huber",
    "flow.label_dropout": "class-conditional models (model.num_classes > 0): share of training labels replaced by "
    "'no label', so that classifier-free guidance can be used (0: never)",
    "sample.n": "images in each sample grid of the run",
    "sample.method": "ODE solver of the sample grids (euler | heun | midpoint | rf_solver | dopri5)",
    "sample.steps": "solver steps of the sample grids",
    "sample.seed": "noise seed of the sample grids",
    **prefixed(TRAIN_HELP, "train."),
}


def check_config(cfg: dict) -> None:
    """Raise on an unknown or bad setting of a `teacher train` config (see DEFAULTS)."""
    full = full_config(DEFAULTS, cfg)
    check_train_config(full["train"])
    dropout = full["flow"]["label_dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"flow.label_dropout must be a number in [0, 1), got {dropout!r}")
    if dropout and not resolve_model_config(full["model"]).get("num_classes"):
        raise ValueError(
            f"flow.label_dropout = {dropout} needs a class-conditional model: set model.num_classes (e.g. 10 for "
            "Fashion-MNIST)"
        )


def teacher_job(cfg: dict) -> TrainingJob:
    """The 1-RF job of a merged config: flow matching on the data set, exported to `out/teacher_ema.safetensors`."""
    data_cfg, flow_cfg, train_cfg = cfg["data"], cfg["flow"], cfg["train"]
    image_set = load_images(data_cfg["name"], split="train", root=data_cfg["root"], image_size=data_cfg["image_size"])
    images, labels = image_set.images, image_set.labels
    model_cfg = resolve_model_config(cfg["model"])
    model_cfg.update(in_channels=images.shape[1], resolution=images.shape[-1])
    num_classes = int(model_cfg.get("num_classes") or 0)
    dropout = float(flow_cfg["label_dropout"])
    run_flow = dict(flow_cfg)
    if num_classes:
        _check_data_labels(labels, num_classes, data_cfg["name"])
    else:
        del run_flow["label_dropout"]  # not in an unconditional run's settings: its config and key are as before
    shape = tuple(images.shape[1:])
    batch_size, seed = train_cfg["batch_size"], train_cfg["seed"]

    def make_batch(step: int, gen: torch.Generator) -> dict:
        index = batch_indices(step, batch_size, len(images), seed)
        x = to_float(images[index])
        if data_cfg["hflip"]:
            (x,) = random_hflip(x, gen)
        z = torch.randn(x.shape, generator=gen)
        t = sample_time(batch_size, flow_cfg["time_sampler"], eps=flow_cfg["eps"], a=flow_cfg["a"], generator=gen)
        batch = flow_matching_batch(z, x, t)
        if num_classes:  # drawn after the unconditional batch's randomness
            y = labels[index].clone()
            if dropout:
                y[torch.rand(batch_size, generator=gen) < dropout] = NO_LABEL
            batch["labels"] = y
        return batch

    s = cfg["sample"]
    return TrainingJob(
        out=cfg["out"],
        kind="1-rf-teacher",
        export_name="teacher_ema.safetensors",
        run_config={**cfg, "model": model_cfg, "flow": run_flow},
        train=train_cfg,
        build=lambda: build_model(model_cfg),
        make_batch=make_batch,
        make_loss=lambda device: velocity_loss(flow_cfg["loss"]),
        sample_fn=lambda net: sample(net, s["n"], shape, method=s["method"], steps=s["steps"], seed=s["seed"])[0],
        meta={"data": data_cfg, "train": train_cfg, **({"label_dropout": dropout} if num_classes else {})},
    )


def _check_data_labels(labels: torch.Tensor | None, num_classes: int, name: str) -> None:
    if labels is None:
        raise ValueError(
            f"model.num_classes = {num_classes} needs a labelled data set, but {name!r} has no labels "
            "(image_folder: put each class in its own sub-folder)"
        )
    found = int(labels.max()) + 1
    if int(labels.min()) < 0 or found > num_classes:
        raise ValueError(
            f"the data set {name!r} has labels in [0, {found}), more than model.num_classes = {num_classes}"
        )


def train_teacher(cfg: dict, command: str | None = None) -> dict:
    """Train a 1-RF teacher from `cfg` (see DEFAULTS), export its EMA weights, return a summary. A run directory
    started with other settings is refused, as in every stage."""
    check_config(cfg)
    cfg = full_config(DEFAULTS, cfg)
    require_writable(cfg["out"])
    return run_training(teacher_job(cfg), command)
