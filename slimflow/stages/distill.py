"""Flow-guided distillation (docs/methods.md, "Flow-guided distillation"): the one-step student starts from the annealed model; a frozen copy of
that model (its EMA weights) is the guide v_φ. With the student evaluated at the one-step time t₀:

    L_distill = D(z + v_φ'(z, t₀), x̂)                        on the teacher pairs (z, x̂)
    ŝ = v_φ'(e, t₀),  x_t' = e + t'·s₁,  y = x_t' + (1 − t')·v_φ(x_t', t')   (y without gradient)
    L_2step   = D(e + ŝ, y)                                   on fresh noise e, t' ~ U(t_min, t_max)
    L = w_distill·L_distill + w_2step·L_2step

s₁ is the student's ŝ (variant "reference", the reference code) or the guide's v_φ(e, t₀) (variant "paper").
t₀ (`loss.one_step_time`) defaults to 0; the exported model file records it, and every stage that samples the
student (`slimflow.sample`), benchmarks or exports it evaluates its one-step generator at that t₀. The reference
code used ε = 1e-3 for both. D is any two-image distance of `slimflow.losses`.

Two settings serve controlled comparisons: `guide` names another frozen guide (e.g. the teacher itself, as a pruned
teacher's recovery uses its unpruned self), and `init: scratch` keeps only the student file's architecture and draws
fresh weights from train.seed (the initial weights the anneal stage gives a student of that architecture and seed).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from slimflow.checkpoint import read_model_file, require_writable, sha256_file
from slimflow.config import prefixed
from slimflow.engine import TRAIN_DEFAULTS, TRAIN_HELP, batch_indices, check_train_config
from slimflow.flow import per_sample
from slimflow.losses import PERCEPTUAL_KINDS, PIXEL_KINDS, Distance, distance
from slimflow.pairs import PairStore, PairStoreError, open_pairs, pairs_record
from slimflow.sample import conditioned, one_step_images, one_step_sampler
from slimflow.stages.runner import (
    TrainingJob,
    check_student_classes,
    full_config,
    last_pairs,
    one_step_eval,
    require_input,
    run_training,
)
from teachers.zoo import build_model, load_model

VARIANTS = ("reference", "paper")
INITS = ("weights", "scratch")
DISTANCES = (*PIXEL_KINDS, *PERCEPTUAL_KINDS)

DEFAULTS: dict = {
    "out": "runs/distill",
    "pairs": "runs/pairs",  # the teacher pairs (z, x̂)
    "teacher": None,  # optional teacher file: the store must have been made by it (hash check)
    "student": "runs/anneal/annealed_ema.safetensors",  # the annealed model: student init and (frozen) guide
    "guide": None,  # another frozen guide of L_2step (null: the student file); out of the run's keys while null
    "init": "weights",  # weights (the student file's) | scratch (its architecture, fresh weights); out while weights
    "loss": {
        "distance": "l2",
        "options": {"_open": True},
        "w_distill": 1.0,
        "w_2step": 1.0,
        "variant": "reference",
        "t_min": 0.2,
        "t_max": 0.8,
        "one_step_time": 0.0,
    },
    "train": copy.deepcopy(TRAIN_DEFAULTS),
    "sample": {"n": 64, "seed": 0},
}

HELP: dict[str, str] = {  # what each setting means (`--help-config`; tests/test_help_config.py checks all have one)
    "out": "run directory: config.yaml, checkpoints/, tb/, samples/, distilled_ema.safetensors, summary.json",
    "pairs": "the teacher pairs (z, x̂) of L_distill",
    "teacher": "optional teacher file: the store must have been made by it (hash check)",
    "student": "the annealed model: the student's start and the frozen guide",
    "guide": "another frozen guide of L_2step, e.g. the teacher (null: the student file)",
    "init": "the student's start: weights (the student file's) | scratch (its architecture, fresh weights from "
    "train.seed, as the anneal stage draws them)",
    "loss.distance": "two-image distance D: l2 | l1 | pseudo_huber | domain | lpips-vgg | lpips-alex",
    "loss.options": "options of that distance",
    "loss.w_distill": "weight of L_distill = D(z + v(z, t0), x̂) on the pairs",
    "loss.w_2step": "weight of L_2step (the two-step guide target on fresh noise; 0: plain distillation)",
    "loss.variant": "first step of the 2-step target: reference (the student's ŝ) | paper (the guide's velocity)",
    "loss.t_min": "smallest intermediate time t' of L_2step",
    "loss.t_max": "largest intermediate time t' of L_2step",
    "loss.one_step_time": "t0 at which the one-step student is trained and evaluated (recorded in its file)",
    "sample.n": "images in each one-step grid of the EMA student",
    "sample.seed": "noise seed of the grids",
    **prefixed(TRAIN_HELP, "train."),
}


# ------------------------------------------------------------------------------------------ pure pieces
def two_step_target(guide: Callable, e: torch.Tensor, first_velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Two Euler steps from e: to x_t = e + t·s₁ with `first_velocity` s₁, then to 1 with the guide:
    y = x_t + (1 − t)·guide(x_t, t); t of shape (B,)."""
    tb = per_sample(t, e)
    x_t = e + tb * first_velocity
    return x_t + (1 - tb) * guide(x_t, t)


def distill_terms(
    student: Callable, guide: Callable, batch: dict, variant: str = "reference", t0: float = 0.0
) -> dict[str, torch.Tensor]:
    """The compared images of both terms: one_step vs pair_image (L_distill), two_step vs two_step_target
    (L_2step). The student runs once on [z; e]; the target is computed without gradient."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown distillation variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    z, e = batch["z"], batch["e"]
    both = torch.cat([z, e])
    times = torch.full((both.shape[0],), t0, dtype=z.dtype, device=z.device)
    labels, e_labels = batch.get("labels"), batch.get("e_labels")  # a class-conditional student's
    both_labels = None if labels is None else torch.cat([labels, e_labels])
    v_z, s_hat = conditioned(student, both_labels)(both, times).split(z.shape[0])
    guide_e = conditioned(guide, e_labels)
    with torch.no_grad():
        first = s_hat.detach() if variant == "reference" else guide_e(e, times[: e.shape[0]])
        y = two_step_target(guide_e, e, first, batch["t2"])
    return {"one_step": z + v_z, "pair_image": batch["x_hat"], "two_step": e + s_hat, "two_step_target": y}


def distill_loss(guide: torch.nn.Module, d: Distance, loss_cfg: dict) -> Callable:
    """loss_fn(model, batch) for the engine: w_distill·mean D(one_step, x̂) + w_2step·mean D(e + ŝ, y); with
    w_2step = 0 only the first term is computed (the student runs on z alone, the guide not at all)."""

    def loss_fn(model, batch):
        if loss_cfg["w_2step"] == 0:  # plain distillation (the ablation baseline): no guide, no second batch
            images = one_step_images(model, batch["z"], loss_cfg["one_step_time"], batch.get("labels"))
            one = d(images, batch["x_hat"]).mean()
            return loss_cfg["w_distill"] * one, {"distill": one.detach()}
        terms = distill_terms(model, guide, batch, loss_cfg["variant"], loss_cfg["one_step_time"])
        one = d(terms["one_step"], terms["pair_image"]).mean()
        two = d(terms["two_step"], terms["two_step_target"]).mean()
        loss = loss_cfg["w_distill"] * one + loss_cfg["w_2step"] * two
        return loss, {"distill": one.detach(), "two_step": two.detach()}

    return loss_fn


def make_distill_batch(store: PairStore, train_cfg: dict, loss_cfg: dict) -> Callable[[int, torch.Generator], dict]:
    """make_batch(step, generator): pairs of epoch-permuted indices, fresh noise e and t' ~ U(t_min, t_max)."""
    batch_size, seed = train_cfg["batch_size"], train_cfg["seed"]
    low, high = loss_cfg["t_min"], loss_cfg["t_max"]

    def make_batch(step: int, gen: torch.Generator) -> dict:
        index = batch_indices(step, batch_size, len(store), seed)
        z, x = store.batch(index)
        e = torch.randn(z.shape, generator=gen)
        t2 = low + (high - low) * torch.rand(batch_size, generator=gen)
        batch = {"z": z, "x_hat": x, "e": e, "t2": t2}
        if store.num_classes:  # the pairs' labels; the fresh noise e gets fresh labels (drawn last)
            batch["labels"] = store.labels(index)
            batch["e_labels"] = torch.randint(store.num_classes, (batch_size,), generator=gen)
        return batch

    return make_batch


def check_loss_config(loss_cfg: dict) -> None:
    kind = loss_cfg["distance"]
    if kind == "lpips_huber":
        raise ValueError(
            "loss.distance 'lpips_huber' does not apply to distillation: it weights its Huber term by "
            "the training time t, and the one-step student is only evaluated at t0 ≈ 0, where that term "
            f"vanishes and what is left is the perceptual distance itself. Use one of {DISTANCES}"
        )
    if kind not in DISTANCES:
        raise ValueError(f"unknown distillation distance {kind!r}; choose one of {', '.join(DISTANCES)}")
    if loss_cfg["variant"] not in VARIANTS:
        raise ValueError(f"unknown loss.variant {loss_cfg['variant']!r}; choose one of {', '.join(VARIANTS)}")
    if not 0.0 <= loss_cfg["t_min"] < loss_cfg["t_max"] <= 1.0:
        raise ValueError(
            f"loss.t_min and loss.t_max must satisfy 0 <= t_min < t_max <= 1, got "
            f"{loss_cfg['t_min']} and {loss_cfg['t_max']}"
        )
    if not 0.0 <= loss_cfg["one_step_time"] < loss_cfg["t_min"]:
        raise ValueError(f"loss.one_step_time must lie in [0, t_min), got {loss_cfg['one_step_time']}")


def check_config(cfg: dict) -> None:
    """Raise on any bad setting of a `distill` config (see DEFAULTS), before any work."""
    cfg = full_config(DEFAULTS, cfg)
    check_train_config(cfg["train"])
    check_loss_config(cfg["loss"])
    if cfg["init"] not in INITS:
        raise ValueError(f"unknown init {cfg['init']!r}; choose one of {', '.join(INITS)}")


def stage_keys(cfg: dict) -> dict:
    """The config as run directories record it: without `guide` and `init` while they keep their defaults, so a run
    made before they existed is still current."""
    return {k: v for k, v in cfg.items() if not ((k == "guide" and v is None) or (k == "init" and v == "weights"))}


def check_same_images(guide_sidecar: dict, student_sidecar: dict, guide_file, student_file) -> None:
    """A guide must take and make the student's images (channels, resolution) and know its classes."""
    keys = ("in_channels", "resolution", "num_classes")
    got = [tuple((s.get("model") or {}).get(k) or 0 for k in keys) for s in (guide_sidecar, student_sidecar)]
    if got[0] != got[1]:
        raise ValueError(
            f"the guide {guide_file} works on (channels, resolution, classes) = {got[0]}, the student {student_file} "
            f"on {got[1]}; a guide must take and make the student's images"
        )


# ------------------------------------------------------------------------------------------ the stage
def distill_job(cfg: dict) -> TrainingJob:
    """The flow-guided distillation job of a merged, checked config: the student starts from the annealed model
    (a pruned one too), its frozen copy is the guide; exported to `out/distilled_ema.safetensors`."""
    store = open_pairs(cfg["pairs"], cfg["teacher"])
    require_input(
        cfg["student"], "annealed model", "run `slimflow anneal` first or set student= to an exported model file"
    )
    sidecar = read_model_file(cfg["student"])[0]
    guide_file = cfg["guide"] or cfg["student"]
    if cfg["guide"]:
        require_input(cfg["guide"], "guide", "set guide= to a model file (or null: the student file)")
        check_same_images(read_model_file(cfg["guide"])[0], sidecar, cfg["guide"], cfg["student"])
    if cfg["init"] == "scratch" and sidecar.get("pruning"):
        raise ValueError(
            f"init scratch rebuilds the student from its network config, and {cfg['student']} is a pruned network "
            "(its widths are not in that config); give an unpruned file of the architecture, or init weights"
        )
    made_from = (sidecar.get("pairs") or {}).get("teacher_hash")
    if made_from is not None and made_from != store.manifest["teacher_hash"]:
        raise PairStoreError(
            f"the pair store {cfg['pairs']} was made by another teacher than the pairs "
            f"{cfg['student']} was trained on (teacher_hash {store.manifest['teacher_hash'][:16]}… vs "
            f"{made_from[:16]}…); distill on pairs of the same teacher"
        )
    guide = load_model(guide_file)
    check_student_classes(int(getattr(guide, "num_classes", 0) or 0), store, f"the guide {guide_file}")
    start = guide if guide_file == cfg["student"] else load_model(cfg["student"])
    check_student_classes(int(getattr(start, "num_classes", 0) or 0), store, f"the annealed model {cfg['student']}")
    student_sha256 = sha256_file(cfg["student"])
    guide_sha256 = student_sha256 if guide_file == cfg["student"] else sha256_file(guide_file)
    guide_kind = read_model_file(guide_file)[0].get("kind")
    record = pairs_record(store)
    loss_cfg = cfg["loss"]

    def build() -> torch.nn.Module:
        if cfg["init"] == "scratch":  # the runner seeds torch with train.seed just before build()
            student = build_model(dict(sidecar["model"])).train().requires_grad_(True)
        else:
            student = copy.deepcopy(start).train().requires_grad_(True)
        student.one_step_time = loss_cfg["one_step_time"]  # its one-step generator is trained at t0
        return student

    def make_loss(device: torch.device) -> Callable:
        d = distance(loss_cfg["distance"], **loss_cfg["options"])
        return distill_loss(guide.to(device), d.to(device) if isinstance(d, torch.nn.Module) else d, loss_cfg)

    s = cfg["sample"]
    return TrainingJob(
        out=Path(cfg["out"]),
        kind="distilled-student",
        export_name="distilled_ema.safetensors",
        run_config={
            **stage_keys(cfg),
            "model": sidecar["model"],
            "student_sha256": student_sha256,
            "pairs_hash": record["hash"],
            **({"guide_sha256": guide_sha256} if cfg["guide"] else {}),
        },
        train=cfg["train"],
        build=build,
        make_batch=make_distill_batch(store, cfg["train"], loss_cfg),
        make_loss=make_loss,
        sample_fn=one_step_sampler(s["n"], store.shape, s["seed"]),
        eval_fn=one_step_eval(
            "one_step_l2_to_teacher", last_pairs(store, cfg["train"]["eval_n"]), loss_cfg["one_step_time"]
        ),
        meta={
            **({"pruning": sidecar["pruning"]} if sidecar.get("pruning") else {}),
            "one_step_time": loss_cfg["one_step_time"],
            "pairs": record,
            "guide": {"file": str(guide_file), "sha256": guide_sha256, "kind": guide_kind},
            **({"init": "scratch"} if cfg["init"] == "scratch" else {}),
        },
        settings=cfg,
    )


def distill(cfg: dict, command: str | None = None) -> dict:
    """Flow-guided distillation from `cfg` (see DEFAULTS): export the EMA student to
    `out/distilled_ema.safetensors` (+ sidecar, kind "distilled-student"), write `out/summary.json`, return it."""
    check_config(cfg)
    cfg = full_config(DEFAULTS, cfg)
    require_writable(cfg["out"])
    return run_training(distill_job(cfg), command)
