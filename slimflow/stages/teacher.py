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
from teachers.zoo import build_model, resolve_model_config

DEFAULTS: dict = {
    "out": "runs/teacher",
    "data": {"name": "fashion_mnist", "root": None, "image_size": 32, "hflip": True},
    "model": {"_open": True, "preset": "fmnist-teacher"},
    "flow": {"time_sampler": "uniform", "eps": 1e-3, "a": 4.0, "loss": "l2"},
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
    "sample.n": "images in each sample grid of the run",
    "sample.method": "ODE solver of the sample grids (euler | heun | midpoint | rf_solver | dopri5)",
    "sample.steps": "solver steps of the sample grids",
    "sample.seed": "noise seed of the sample grids",
    **prefixed(TRAIN_HELP, "train."),
}


def check_config(cfg: dict) -> None:
    """Raise on an unknown or bad setting of a `teacher train` config (see DEFAULTS)."""
    check_train_config(full_config(DEFAULTS, cfg)["train"])


def teacher_job(cfg: dict) -> TrainingJob:
    """The 1-RF job of a merged config: flow matching on the data set, exported to `out/teacher_ema.safetensors`."""
    data_cfg, flow_cfg, train_cfg = cfg["data"], cfg["flow"], cfg["train"]
    images = load_images(
        data_cfg["name"], split="train", root=data_cfg["root"], image_size=data_cfg["image_size"]
    ).images
    model_cfg = resolve_model_config(cfg["model"])
    model_cfg.update(in_channels=images.shape[1], resolution=images.shape[-1])
    shape = tuple(images.shape[1:])
    batch_size, seed = train_cfg["batch_size"], train_cfg["seed"]

    def make_batch(step: int, gen: torch.Generator) -> dict:
        x = to_float(images[batch_indices(step, batch_size, len(images), seed)])
        if data_cfg["hflip"]:
            (x,) = random_hflip(x, gen)
        z = torch.randn(x.shape, generator=gen)
        t = sample_time(batch_size, flow_cfg["time_sampler"], eps=flow_cfg["eps"], a=flow_cfg["a"], generator=gen)
        return flow_matching_batch(z, x, t)

    s = cfg["sample"]
    return TrainingJob(
        out=cfg["out"],
        kind="1-rf-teacher",
        export_name="teacher_ema.safetensors",
        run_config={**cfg, "model": model_cfg},
        train=train_cfg,
        build=lambda: build_model(model_cfg),
        make_batch=make_batch,
        make_loss=lambda device: velocity_loss(flow_cfg["loss"]),
        sample_fn=lambda net: sample(net, s["n"], shape, method=s["method"], steps=s["steps"], seed=s["seed"])[0],
        meta={"data": data_cfg, "train": train_cfg},
    )


def train_teacher(cfg: dict, command: str | None = None) -> dict:
    """Train a 1-RF teacher from `cfg` (see DEFAULTS), export its EMA weights, return a summary. A run directory
    started with other settings is refused, as in every stage."""
    check_config(cfg)
    cfg = full_config(DEFAULTS, cfg)
    require_writable(cfg["out"])
    return run_training(teacher_job(cfg), command)
