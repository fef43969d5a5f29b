"""Train a 1-rectified-flow teacher on an image data set (SPEC §1)."""
from __future__ import annotations

import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from slimflow import config as cfglib
from slimflow.checkpoint import save_model
from slimflow.data import load_images, to_float
from slimflow.engine import TRAIN_DEFAULTS, Trainer, batch_indices
from slimflow.flow import interpolate, sample_time, velocity_target
from slimflow.losses import distance
from slimflow.sample import sample
from teachers.zoo import build_model, resolve_model_config

DEFAULTS: dict = {
    "out": "runs/teacher",
    "data": {"name": "fashion_mnist", "root": None, "image_size": 32, "hflip": True},
    "model": {"_open": True, "preset": "fmnist-teacher"},
    "flow": {"time_sampler": "uniform", "eps": 1e-3, "a": 4.0, "loss": "l2"},
    "train": copy.deepcopy(TRAIN_DEFAULTS),
    "sample": {"n": 64, "method": "euler", "steps": 100, "seed": 0},
}


def random_hflip(images: torch.Tensor, generator: torch.Generator, *others: torch.Tensor) -> list[torch.Tensor]:
    """Flip each sample left-right with probability ½; the same flip is applied to every tensor given."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return [torch.where(flip.view(-1, *[1] * (t.dim() - 1)), t.flip(-1), t) for t in (images, *others)]


def flow_matching_batch(noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> dict:
    """Inputs and target of the rectified-flow loss: x_t, t and v* = x − z."""
    return {"x_t": interpolate(noise, data, t), "t": t, "target": velocity_target(noise, data)}


def velocity_loss(kind: str):
    """loss_fn(model, batch) for the engine: mean over the batch of D(v_θ(x_t, t), v*)."""
    d = distance(kind)

    def loss_fn(model, batch):
        return d(model(batch["x_t"], batch["t"]), batch["target"]).mean()

    return loss_fn


def train_teacher(cfg: dict, command: str | None = None) -> dict:
    """Train a 1-RF teacher from `cfg` (see DEFAULTS), export its EMA weights, return a summary."""
    out = Path(cfg["out"])
    data_cfg, flow_cfg, train_cfg = cfg["data"], cfg["flow"], cfg["train"]
    images = load_images(data_cfg["name"], split="train", root=data_cfg["root"], image_size=data_cfg["image_size"]).images
    model_cfg = resolve_model_config(cfg["model"])
    model_cfg.update(in_channels=images.shape[1], resolution=images.shape[-1])
    run_config = {**cfg, "model": model_cfg}
    torch.manual_seed(train_cfg["seed"])  # initial weights are a function of the seed
    model = build_model(model_cfg)
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

    def sample_fn(net):
        return sample(net, s["n"], shape, method=s["method"], steps=s["steps"], seed=s["seed"])[0]

    trainer = Trainer(model, train_cfg, out, run_config, sample_fn=sample_fn)
    cfglib.dump(run_config, _mkdir(out) / "config.yaml")
    started = time.time()
    result = trainer.fit(make_batch, velocity_loss(flow_cfg["loss"]))
    summary = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": result["steps"],
        "img_per_s": result["img_per_s"],
        "seconds_this_session": time.time() - started,
        "final_loss": result["history"][-1]["train/loss"] if result["history"] else None,
    }
    if trainer.rank == 0:
        export = out / "teacher_ema.safetensors"
        save_model(export, trainer.ema or trainer.model, {
            "model": model_cfg, "kind": "1-rf-teacher", "time_convention": "t=0 noise, t=1 data",
            "data": data_cfg, "steps": result["steps"], "command": command or " ".join(map(shlex.quote, sys.argv)),
            "train": train_cfg,
        })
        summary["export"] = str(export)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
