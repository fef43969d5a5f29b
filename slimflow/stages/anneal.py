"""Annealing reflow (docs/methods.md, "Annealing reflow"): a small student trained from scratch on teacher pairs (z, x̂) whose noise is
annealed from independent (β = 1, plain 1-RF on the teacher's images) to the paired noise (β = 0, plain reflow):

    z̃ = sqrt(1 − β_k²)·z + β_k·ε',  ε' ~ N(0, I) fresh each step,
    t ~ sampler, x_t = t·x̂ + (1 − t)·z̃,  loss D(v_θ(x_t, t), x̂ − z̃),

with (z̃, x̂) flipped left-right together, per sample, with probability ½ (configurable off).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch

from slimflow.checkpoint import model_identity, read_model_file, require_writable
from slimflow.config import prefixed
from slimflow.engine import TRAIN_DEFAULTS, TRAIN_HELP, batch_indices, check_train_config
from slimflow.flow import flow_matching_batch, per_sample, random_hflip, sample_time
from slimflow.losses import PERCEPTUAL_KINDS, PIXEL_KINDS, distance, lpips_huber, velocity_loss
from slimflow.pairs import PairStore, open_pairs, pairs_record
from slimflow.sample import conditioned, one_step_sampler
from slimflow.stages.runner import (
    TrainingJob,
    check_student_classes,
    full_config,
    last_pairs,
    one_step_eval,
    run_training,
)
from teachers.zoo import build_model, load_model, resolve_model_config

BETA_SCHEDULES = ("linear", "exp", "cosine", "constant")
ANNEAL_LOSSES = (*PIXEL_KINDS, "lpips_huber")

DEFAULTS: dict = {
    "out": "runs/anneal",
    "pairs": "runs/pairs",  # a finished pair store (slimflow pairs generate)
    "teacher": None,  # optional teacher file: the store must have been made by it (hash check)
    "model": {"_open": True, "preset": "fmnist-student-s"},
    "init": None,  # optional model file: tensors of matching name and shape are copied into the student
    "init_architecture": False,  # True: the student is the init file's network (e.g. a pruned teacher); model unused
    "beta": {"schedule": "linear", "steps": None, "value": 1.0},  # steps N (None: train.steps); value: constant β
    "flow": {
        "time_sampler": "uniform",
        "eps": 1e-3,
        "a": 4.0,
        "loss": "l2",
        "perceptual": "domain",
        "perceptual_options": {"_open": True},
        "one_over_t": False,
    },
    "hflip": True,
    "train": copy.deepcopy(TRAIN_DEFAULTS),
    "sample": {"n": 64, "seed": 0},  # 1-step grids of the EMA student during training
}

HELP: dict[str, str] = {  # what each setting means (`--help-config`; tests/test_help_config.py checks all have one)
    "out": "run directory: config.yaml, checkpoints/, tb/, samples/, annealed_ema.safetensors, summary.json",
    "pairs": "the finished pair store the student trains on (slimflow pairs generate)",
    "teacher": "optional teacher file: the store must have been made by it (hash check)",
    "model": "the student network: a preset of teachers.zoo and/or UNet settings (nf, ch_mult, ...)",
    "model.preset": "named student architecture of teachers.zoo",
    "init": "optional model file: tensors of matching name and shape are copied into the student",
    "init_architecture": "true: the student is init's own network and weights (e.g. the teacher pruned by slimflow "
    "prune; its pruning record is kept), `model` is not used",
    "beta.schedule": "noise annealing β_k from 1 (independent noise) to 0 (the pair's noise): linear | exp | cosine | constant",
    "beta.steps": "steps N of the annealing (null: train.steps)",
    "beta.value": "β of the constant schedule",
    "flow.time_sampler": "training times: uniform on [eps, 1] | u_shaped | logit_normal",
    "flow.eps": "smallest training time of the uniform sampler",
    "flow.a": "steepness of the u_shaped time density",
    "flow.loss": "l2 | l1 | pseudo_huber on velocities, or lpips_huber (rfpp) on the predicted images",
    "flow.perceptual": "perceptual distance of lpips_huber: domain | lpips-vgg | lpips-alex",
    "flow.perceptual_options": "options of that perceptual distance",
    "flow.one_over_t": "lpips_huber: weight the Huber term by 1/t",
    "hflip": "flip each pair (noise and image together) left-right with probability ½",
    "sample.n": "images in each one-step grid of the EMA student",
    "sample.seed": "noise seed of the grids",
    **prefixed(TRAIN_HELP, "train."),
}


# ------------------------------------------------------------------------------------------ pure pieces
def beta_schedule(kind: str, step: int, n: int, value: float = 1.0) -> float:
    """β_k of the noise annealing at step k over N steps: linear 1 − min(1, k/N), exp e^{−k/N},
    cosine (1 + cos(π·min(1, k/N)))/2, or constant `value`."""
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    if kind == "constant":
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"constant beta must lie in [0, 1], got {value}")
        return float(value)
    if n < 1:
        raise ValueError(f"beta schedule {kind!r} needs N >= 1 steps, got {n}")
    progress = step / n
    if kind == "linear":
        return 1.0 - min(1.0, progress)
    if kind == "exp":
        return math.exp(-progress)
    return (1.0 + math.cos(math.pi * min(1.0, progress))) / 2.0


def perturb_noise(z: torch.Tensor, beta: float, generator: torch.Generator) -> torch.Tensor:
    """sqrt(1 − β²)·z + β·ε' with ε' ~ N(0, I) drawn from `generator` (unit variance is kept for any β in [0, 1]).
    β = 0 returns z itself; ε' is drawn on the generator's device, then moved to z's."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return z
    fresh = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=generator.device).to(z.device)
    return math.sqrt(1.0 - beta * beta) * z + beta * fresh


# ------------------------------------------------------------------------------------------ the trainer
def check_flow_config(flow_cfg: dict) -> None:
    kind = flow_cfg["loss"]
    if kind not in ANNEAL_LOSSES:
        raise ValueError(
            f"unknown annealing loss {kind!r}; choose one of {', '.join(ANNEAL_LOSSES)} (a perceptual "
            f"distance alone compares images, not velocities: use lpips_huber with flow.perceptual)"
        )
    if kind == "lpips_huber" and flow_cfg["perceptual"] not in PERCEPTUAL_KINDS:
        raise ValueError(f"flow.perceptual must be one of {PERCEPTUAL_KINDS}, got {flow_cfg['perceptual']!r}")


def check_anneal_config(cfg: dict) -> None:
    """The training, β schedule and loss settings of an anneal config (before any work is done)."""
    check_train_config(cfg["train"])
    check_flow_config(cfg["flow"])
    if not isinstance(cfg["init_architecture"], bool):
        raise ValueError(f"init_architecture must be true or false, got {cfg['init_architecture']!r}")
    if cfg["init_architecture"] and not cfg["init"]:
        raise ValueError("init_architecture: true makes the init file's network the student: set init to that file")
    beta = cfg["beta"]
    if beta["schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta.schedule {beta['schedule']!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    if beta["schedule"] == "constant" and not 0.0 <= beta["value"] <= 1.0:
        raise ValueError(f"beta.value (the constant β) must lie in [0, 1], got {beta['value']}")
    steps = beta["steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"beta.steps must be an integer >= 1 or null (the whole run), got {steps!r}")


def check_config(cfg: dict) -> None:
    """Raise on any bad setting of an `anneal` config (see DEFAULTS), before any work."""
    check_anneal_config(full_config(DEFAULTS, cfg))


def anneal_loss(flow_cfg: dict, device: torch.device | None = None) -> Callable:
    """loss_fn(model, batch) for the engine, from `flow.loss`: a pixel distance on velocities (l2, l1,
    pseudo_huber) or rfpp's LPIPS–Huber (`flow.perceptual` net on `device`, `flow.one_over_t`)."""
    check_flow_config(flow_cfg)
    if flow_cfg["loss"] in PIXEL_KINDS:
        pixel = velocity_loss(flow_cfg["loss"])

        def loss_fn(model, batch):
            return pixel(model, batch), {"beta": batch["beta"]}

        return loss_fn
    perceptual = distance(flow_cfg["perceptual"], **flow_cfg["perceptual_options"]).to(device)

    def loss_fn(model, batch):
        x_t, t, target = batch["x_t"], batch["t"], batch["target"]
        v = conditioned(model, batch.get("labels"))(x_t, t)
        rest = 1.0 - per_sample(t, x_t)
        # clean image predicted from x_t, and the pair's image x̂ = x_t + (1 − t)·(x̂ − z̃)
        loss = lpips_huber(x_t + rest * v, x_t + rest * target, v, target, t, perceptual, flow_cfg["one_over_t"])
        return loss.mean(), {"beta": batch["beta"]}

    return loss_fn


def make_anneal_batch(store: PairStore, cfg: dict) -> Callable[[int, torch.Generator], dict]:
    """make_batch(step, generator) for the engine: pairs of epoch-permuted indices, β-annealed noise, per-sample
    joint flip, training times — every random draw from `generator` — and, from a class-conditional store, the
    pairs' labels (regenerated from their indices)."""
    train, beta_cfg, flow = cfg["train"], cfg["beta"], cfg["flow"]
    batch_size, seed = train["batch_size"], train["seed"]
    n_anneal = beta_cfg["steps"] or train["steps"]

    def make_batch(step: int, gen: torch.Generator) -> dict:
        index = batch_indices(step, batch_size, len(store), seed)
        z, x = store.batch(index)
        beta = beta_schedule(beta_cfg["schedule"], step, n_anneal, beta_cfg["value"])
        z = perturb_noise(z, beta, gen)
        if cfg["hflip"]:
            z, x = random_hflip(z, gen, x)
        t = sample_time(batch_size, flow["time_sampler"], eps=flow["eps"], a=flow["a"], generator=gen)
        labels = store.labels(index)
        return {**flow_matching_batch(z, x, t), "beta": beta, **({} if labels is None else {"labels": labels})}

    return make_batch


# ------------------------------------------------------------------------------------------ the stage
def copy_matching(model: torch.nn.Module, path: str | Path) -> dict:
    """Copy into `model` every tensor of the model file `path` whose name and shape match; report what was copied."""
    _, weights = read_model_file(path)
    own = model.state_dict()
    matching = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    skipped = sorted(set(own) - set(matching))
    more = [f"... {len(skipped) - 20} more"] if len(skipped) > 20 else []
    return {
        "from": str(path),
        "copied_tensors": len(matching),
        "model_tensors": len(own),
        "copied_values": sum(v.numel() for v in matching.values()),
        "not_copied": skipped[:20] + more,
    }


def _init_network(path: str | Path, shape: tuple) -> tuple[dict, dict | None, dict]:
    """(model config, pruning record, identity) of an `init_architecture` file, checked against the pairs' shape."""
    sidecar, _ = read_model_file(path)
    model_cfg = sidecar.get("model")
    if not isinstance(model_cfg, dict) or "nf" not in model_cfg:
        raise ValueError(f"init {path} is not a UNet model file of this project, so its network cannot be the student")
    if (model_cfg.get("in_channels"), model_cfg.get("resolution")) != (shape[0], shape[-1]):
        raise ValueError(
            f"init {path} takes {model_cfg.get('in_channels')}x{model_cfg.get('resolution')}px images, the pairs are "
            f"{shape[0]}x{shape[-1]}px"
        )
    return dict(model_cfg), sidecar.get("pruning"), {"from": str(path), "sha256": model_identity(path)}


def anneal_job(cfg: dict) -> TrainingJob:
    """The annealing-reflow job of a merged, checked config: the student on the pair store, exported to
    `out/annealed_ema.safetensors` (kind "annealed-student"). With `init_architecture` the student is the init
    file's network (a pruned teacher keeps its pruning record, so the export loads like any pruned file)."""
    store = open_pairs(cfg["pairs"], cfg["teacher"])
    record = pairs_record(store)
    init: dict = {}
    pruning = None
    if cfg["init_architecture"]:
        model_cfg, pruning, init = _init_network(cfg["init"], store.shape)
        check_student_classes(int(model_cfg.get("num_classes") or 0), store, f"init {cfg['init']}")

        def build() -> torch.nn.Module:
            return load_model(cfg["init"]).float().train().requires_grad_(True)

    else:
        model_cfg = resolve_model_config(cfg["model"])
        model_cfg.update(in_channels=store.shape[0], resolution=store.shape[-1])
        if store.num_classes:  # the student is conditioned on its pairs' labels
            model_cfg.setdefault("num_classes", store.num_classes)
        check_student_classes(int(model_cfg.get("num_classes") or 0), store, "the student (model.num_classes)")

        def build() -> torch.nn.Module:
            model = build_model(model_cfg)
            if cfg["init"]:
                init.update(copy_matching(model, cfg["init"]))
            return model

    s = cfg["sample"]
    return TrainingJob(
        out=Path(cfg["out"]),
        kind="annealed-student",
        export_name="annealed_ema.safetensors",
        run_config={
            **cfg,
            "model": model_cfg,
            "pairs_hash": record["hash"],
            **({"init_network": {"sha256": init["sha256"], "pruning": pruning}} if cfg["init_architecture"] else {}),
        },
        train=cfg["train"],
        build=build,
        make_batch=make_anneal_batch(store, cfg),
        make_loss=lambda device: anneal_loss(cfg["flow"], device),
        sample_fn=one_step_sampler(s["n"], store.shape, s["seed"]),
        eval_fn=one_step_eval("one_step_l2_to_teacher", last_pairs(store, cfg["train"]["eval_n"])),
        meta={"pairs": record, "init": init if cfg["init"] else None, **({"pruning": pruning} if pruning else {})},
        summary={"init": init if cfg["init"] else None},
        settings=cfg,
    )


def anneal(cfg: dict, command: str | None = None) -> dict:
    """Annealing reflow from `cfg` (see DEFAULTS): train the student on the pair store, export its EMA weights to
    `out/annealed_ema.safetensors` (+ sidecar, kind "annealed-student"), write `out/summary.json`, return it."""
    cfg = full_config(DEFAULTS, cfg)
    check_anneal_config(cfg)
    require_writable(cfg["out"])
    return run_training(anneal_job(cfg), command)
