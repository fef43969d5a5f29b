"""`slimflow pairs generate`: (noise seed, image) pairs from a teacher's ODE into a pair store (slimflow.pairs)."""

from __future__ import annotations

import time

from slimflow.checkpoint import require_writable
from slimflow.engine import resolve_device
from slimflow.pairs import generate_pairs
from slimflow.solvers import FIXED_STEP_METHODS, METHODS
from slimflow.stages.runner import TEACHER_HINT, full_config, require_input
from teachers.zoo import load_model

DEFAULTS: dict = {
    "out": "runs/pairs",
    "teacher": "teachers/weights/fmnist_teacher.safetensors",
    "teacher_resolution": None,  # image size of a reference DDPM++ .pth teacher (it does not record it)
    "n": 2000,
    "seed": 0,
    "solver": {"method": "euler", "steps": 16, "rtol": 1e-5, "atol": 1e-5, "max_steps": 10_000},
    "shard_size": 500,
    "batch_size": 100,
    "image_format": "float16",
    "device": "auto",
    "guidance": 1.0,
}

HELP: dict[str, str] = {  # what each setting means (`--help-config`; tests/test_help_config.py checks all have one)
    "out": "the pair store's folder (shards, their records, manifest.json)",
    "teacher": "teacher model file whose ODE makes the pairs",
    "teacher_resolution": "image size of a reference DDPM++ .pth teacher (it does not record it)",
    "n": "number of (noise, image) pairs",
    "seed": "noise seed: pair i's noise is drawn from (seed, i) and never stored",
    "solver.method": "ODE solver of the teacher: euler | heun | midpoint | rf_solver | dopri5",
    "solver.steps": "steps of a fixed-step solver",
    "solver.rtol": "relative tolerance of dopri5",
    "solver.atol": "absolute tolerance of dopri5",
    "solver.max_steps": "most steps dopri5 may take per batch",
    "shard_size": "pairs per shard file",
    "batch_size": "pairs solved at once",
    "image_format": "stored images: float16 (values kept) | uint8 (error <= 1/255)",
    "device": "auto (GPU when available) | cpu | cuda | cuda:N",
    "guidance": "class-conditional teacher: classifier-free guidance scale w of its ODE, v = v(∅) + w·(v(c) − v(∅)) "
    "(1: none); pair i's label is drawn from (seed, i) like its noise",
}


def solver_kwargs(solver: dict) -> dict:
    """The `solve` arguments a method uses: steps for fixed-step methods, rtol/atol/max_steps for dopri5."""
    method = solver["method"]
    if method not in METHODS:
        raise ValueError(f"unknown solver.method {method!r}; choose one of {', '.join(METHODS)}")
    if method in FIXED_STEP_METHODS:
        return {"method": method, "steps": solver["steps"]}
    return {"method": method, "rtol": solver["rtol"], "atol": solver["atol"], "max_steps": solver["max_steps"]}


def check_config(cfg: dict) -> None:
    solver_kwargs(full_config(DEFAULTS, cfg)["solver"])


def generate_pairs_from_config(cfg: dict) -> dict:
    """Solve the teacher ODE for `n` pairs into the store `out` (see DEFAULTS); resumable. Returns the manifest plus
    this call's wall time (seconds_this_session)."""
    cfg = full_config(DEFAULTS, cfg)
    solver = solver_kwargs(cfg["solver"])
    require_writable(cfg["out"])
    require_input(cfg["teacher"], "teacher file", TEACHER_HINT)
    teacher = load_model(cfg["teacher"], resolution=cfg["teacher_resolution"], device=resolve_device(cfg["device"]))
    started = time.time()
    manifest = generate_pairs(
        teacher,
        cfg["out"],
        n=cfg["n"],
        shape=list(teacher.sample_shape),
        seed=cfg["seed"],
        solver=solver,
        shard_size=cfg["shard_size"],
        batch_size=cfg["batch_size"],
        image_format=cfg["image_format"],
        guidance=cfg["guidance"],
    )
    return {**manifest, "seconds_this_session": time.time() - started}
