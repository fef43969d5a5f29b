"""Pair generation from a config, and `run`: teacher → pairs → anneal → distill → comparison grids, in one folder.

Run folder (`out`): config.yaml, pairs/ (the pair store, unless pairs.dir puts it elsewhere), anneal/ and distill/
(each: config.yaml, checkpoints/, tb/, samples/, the exported EMA model, summary.json), grids/ (teacher 1-step,
teacher many-step, annealed and distilled student 1-step, all from the same noise, and side_by_side.png), tb/ (the
grids), summary.json.
Each stage is skipped when its output is complete and current, resumed from its checkpoints when partial.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from slimflow import anneal as anneal_stage
from slimflow import config as cfglib
from slimflow import distill as distill_stage
from slimflow.anneal import barrier, command_line, export_is_current, full_config, pairs_hash, plain_config
from slimflow.checkpoint import latest_checkpoint, read_model_file, sha256_file
from slimflow.engine import resolve_device
from slimflow.images import grid_image, save_grid
from slimflow.losses import distance, l2
from slimflow.pairs import PairStore, generate_pairs, state_dict_hash
from slimflow.sample import sample
from slimflow.solvers import FIXED_STEP_METHODS, METHODS

PAIRS_DEFAULTS: dict = {
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
}

DEFAULTS: dict = {
    "out": "runs/run",
    "teacher": PAIRS_DEFAULTS["teacher"],
    "teacher_resolution": None,  # image size of a reference DDPM++ .pth teacher (it does not record it)
    # pairs.dir: where the pair store lives (None: <out>/pairs); runs that name the same dir share one store
    "pairs": {"dir": None, **{k: copy.deepcopy(v) for k, v in PAIRS_DEFAULTS.items()
                                  if k not in ("out", "teacher", "teacher_resolution")}},
    "anneal": {k: copy.deepcopy(v) for k, v in anneal_stage.DEFAULTS.items() if k not in ("out", "pairs", "teacher")},
    "distill": {k: copy.deepcopy(v) for k, v in distill_stage.DEFAULTS.items()
                if k not in ("out", "pairs", "teacher", "student")},
    "grids": {"n": 64, "seed": 0},  # the teacher's many-step grid uses the pairs' solver
}
GRIDS = ("teacher_1step", "teacher_ode", "annealed_1step", "distilled_1step")


# ------------------------------------------------------------------------------------------------ pairs
def solver_kwargs(solver: dict) -> dict:
    """The `solve` arguments a method uses: steps for fixed-step methods, rtol/atol/max_steps for dopri5."""
    method = solver["method"]
    if method not in METHODS:
        raise ValueError(f"unknown solver.method {method!r}; choose one of {', '.join(METHODS)}")
    if method in FIXED_STEP_METHODS:
        return {"method": method, "steps": solver["steps"]}
    return {"method": method, "rtol": solver["rtol"], "atol": solver["atol"], "max_steps": solver["max_steps"]}


def load_teacher_file(path: str | Path, resolution: int | None = None) -> torch.nn.Module:
    """The teacher at `path` (any format `teachers.inspect.load_teacher` reads) with a known sample shape;
    `resolution` is needed by reference DDPM++ checkpoints only."""
    from teachers.inspect import load_teacher

    if not Path(path).exists():
        raise FileNotFoundError(f"teacher file {str(path)!r} does not exist; train one with `slimflow teacher train` "
                                "or set teacher= to a model file")
    teacher = load_teacher(path, resolution=resolution)
    if getattr(teacher, "sample_shape", None) is None:
        raise ValueError(f"the teacher {str(path)!r} does not record its sample shape (C, H, W)")
    return teacher


def generate_pairs_from_config(cfg: dict) -> dict:
    """Solve the teacher ODE for `n` pairs into the store `out` (see PAIRS_DEFAULTS); resumable. Returns the
    manifest plus this call's wall time (seconds_this_session)."""
    cfg = full_config(PAIRS_DEFAULTS, cfg)
    teacher = load_teacher_file(cfg["teacher"], cfg["teacher_resolution"])
    device = resolve_device(cfg["device"])
    started = time.time()
    manifest = generate_pairs(teacher.to(device), cfg["out"], n=cfg["n"], shape=list(teacher.sample_shape),
                              seed=cfg["seed"], solver=solver_kwargs(cfg["solver"]), shard_size=cfg["shard_size"],
                              batch_size=cfg["batch_size"], image_format=cfg["image_format"])
    return {**manifest, "seconds_this_session": time.time() - started}


# ------------------------------------------------------------------------------------------------ grids
def _one_step(model: torch.nn.Module, n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return sample(model, n, shape, method="euler", steps=1, seed=seed)[0]


def side_by_side(grids: dict[str, torch.Tensor], titles: dict[str, str], path: Path) -> Path:
    """One figure with the grids next to each other, titled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4.4))
    for ax, (name, images) in zip(axes, grids.items()):
        ax.imshow(grid_image(images).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(titles[name], fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_grids(out: Path, teacher: torch.nn.Module, students: dict[str, Path], solver: dict, n: int,
                seed: int) -> dict:
    """Grids of the teacher (1 step and its ODE with `solver`) and the students (1 step) from the noise of
    (seed, 0..n-1); PNGs, side_by_side.png and TensorBoard images under `out`, and each grid's mean l2 to the
    teacher's ODE images on the same noise."""
    from torch.utils.tensorboard import SummaryWriter

    from teachers.zoo import load_model

    device = next(teacher.parameters()).device
    shape = tuple(teacher.sample_shape)
    ode, nfe = sample(teacher, n, shape, seed=seed, **solver)
    grids = {"teacher_1step": _one_step(teacher, n, shape, seed), "teacher_ode": ode}
    for name, path in students.items():
        grids[name] = _one_step(load_model(path, device=device), n, shape, seed)
    titles = {"teacher_1step": "teacher, 1 step", "teacher_ode": f"teacher, {solver['method']} ({nfe:g} NFE)",
              "annealed_1step": "annealed student, 1 step", "distilled_1step": "distilled student, 1 step"}
    files = {name: str(save_grid(images, out / "grids" / f"{name}.png")) for name, images in grids.items()}
    files["side_by_side"] = str(side_by_side(grids, titles, out / "grids" / "side_by_side.png"))
    with SummaryWriter(str(out / "tb")) as writer:
        for name, images in grids.items():
            writer.add_image(f"grids/{name}", grid_image(images), 0)
    return {"files": files, "teacher_ode_nfe": nfe,
            "l2_to_teacher_ode": {name: l2(images, ode).mean().item() for name, images in grids.items()
                                  if name != "teacher_ode"}}


# ------------------------------------------------------------------------------------------------ run
def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _sidecar(export: Path) -> dict:
    return read_model_file(export)[0]


def _train_stage(runner, cfg: dict, export: Path, inputs_current: bool, command: str) -> dict:
    """Run (or resume) a training stage unless its export is current: made from this config and these inputs."""
    current = inputs_current and export_is_current(export, cfg)
    if current:
        status = "skipped"
    else:
        status = "resumed" if latest_checkpoint(export.parent / "checkpoints") is not None else "ran"
    started = time.time()
    if not current:
        runner(cfg, command=command)
    summary = _read_json(export.parent / "summary.json") or {}
    final = summary.get("final") or {}
    return {"status": status, "wall_s": time.time() - started, "params": summary.get("params"),
            "steps": summary.get("steps"), "img_per_s": summary.get("img_per_s"),
            "seconds_of_last_session": summary.get("seconds_this_session"),
            "final_losses": {k.removeprefix("train/"): v for k, v in final.items()
                             if k in ("train/loss", "train/distill", "train/two_step", "train/beta")},
            "export": str(export)}


def _check_settings(cfg: dict) -> None:
    """Every stage's settings, and the weights its distances need, before any work (not after an hour of it)."""
    solver_kwargs(cfg["pairs"]["solver"])
    anneal_stage.anneal_loss(cfg["anneal"]["flow"])
    anneal_stage.check_anneal_config(cfg["anneal"])
    loss = cfg["distill"]["loss"]
    distill_stage.check_loss_config(loss)
    distance(loss["distance"], **loss["options"])


def check_config(cfg: dict) -> None:
    """Raise on any bad setting of a `run` config (see DEFAULTS) or a distance whose weights are missing."""
    _check_settings(full_config(DEFAULTS, cfg))


def run_pipeline(cfg: dict, command: str | None = None) -> dict:
    """pairs → anneal → distill → grids from the teacher file in `cfg` (see DEFAULTS) into `cfg.out`; writes and
    returns the summary (sizes, wall time per stage, pairs/s, NFE/pair, final losses, paths). `command` is recorded
    in the students' sidecars (default: this process's command line)."""
    command = command_line(command)
    cfg = full_config(DEFAULTS, cfg)
    _check_settings(cfg)
    teacher = load_teacher_file(cfg["teacher"], cfg["teacher_resolution"])
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    stages: dict[str, dict] = {}

    pairs_settings = {k: v for k, v in cfg["pairs"].items() if k != "dir"}
    pairs_dir = Path(cfg["pairs"]["dir"]) if cfg["pairs"]["dir"] else out / "pairs"
    before = (_read_json(pairs_dir / "manifest.json") or {}).get("status")
    manifest = generate_pairs_from_config({**pairs_settings, "out": str(pairs_dir), "teacher": cfg["teacher"],
                                           "teacher_resolution": cfg["teacher_resolution"]})
    # the stages re-check the store's teacher hash from the teacher file; a reference .pth needs its resolution
    # for that, which they do not take, and the store was made by this very teacher a moment ago
    checked_teacher = cfg["teacher"] if cfg["teacher_resolution"] is None else None
    status = {"complete": "skipped", "running": "resumed"}.get(before, "ran")
    stages["pairs"] = {"status": status, "wall_s": manifest["seconds_this_session"],
                       "count": manifest["count"], "solver": manifest["solver"],
                       "pairs_per_s": manifest["pairs_per_s"], "nfe_per_pair": manifest["nfe_per_pair_mean"],
                       "teacher_hash": manifest["teacher_hash"], "dir": str(pairs_dir)}
    current_pairs = pairs_hash(PairStore(pairs_dir))

    anneal_cfg = full_config(anneal_stage.DEFAULTS, {**cfg["anneal"], "out": str(out / "anneal"),
                                                     "pairs": str(pairs_dir), "teacher": checked_teacher})
    annealed = out / "anneal" / "annealed_ema.safetensors"
    fresh = annealed.is_file() and (_sidecar(annealed).get("pairs") or {}).get("hash") == current_pairs
    stages["anneal"] = _train_stage(anneal_stage.anneal, anneal_cfg, annealed, fresh, f"{command} (stage anneal)")

    distill_cfg = full_config(distill_stage.DEFAULTS, {**cfg["distill"], "out": str(out / "distill"),
                                                       "pairs": str(pairs_dir), "teacher": checked_teacher,
                                                       "student": str(annealed)})
    distilled = out / "distill" / "distilled_ema.safetensors"
    fresh = distilled.is_file() and (_sidecar(distilled).get("guide") or {}).get("sha256") == sha256_file(annealed)
    stages["distill"] = _train_stage(distill_stage.distill, distill_cfg, distilled, fresh,
                                     f"{command} (stage distill)")

    summary = None
    if _is_rank0():
        teacher = teacher.to(resolve_device(cfg["pairs"]["device"]))
        stages["grids"] = _grids_stage(out, cfg, teacher, {"annealed_1step": annealed, "distilled_1step": distilled})
        summary = {
            "out": str(out), "config": str(out / "config.yaml"), "teacher": cfg["teacher"],
            "params": {"teacher": sum(p.numel() for p in teacher.parameters()),
                       "annealed": stages["anneal"]["params"], "distilled": stages["distill"]["params"]},
            "stages": stages, "wall_s_this_call": time.time() - began, "torch_threads": torch.get_num_threads(),
        }
        cfglib.dump(plain_config(cfg), out / "config.yaml")  # the settings the outputs in `out` were made with
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    barrier()
    return summary or _read_json(out / "summary.json")


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _grids_stage(out: Path, cfg: dict, teacher: torch.nn.Module, students: dict[str, Path]) -> dict:
    """Grids unless grids/grids.json was made from the same teacher, students, solver and grid settings."""
    started = time.time()
    solver = solver_kwargs(cfg["pairs"]["solver"])
    key = {"teacher": state_dict_hash(teacher), "solver": solver, "grids": cfg["grids"],
           **{name: sha256_file(path) for name, path in students.items()}}
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    record_path = out / "grids" / "grids.json"
    record = _read_json(record_path)
    status = "skipped"
    if record is None or record.get("key") != key_hash or not all(Path(f).is_file() for f in record["files"].values()):
        status = "ran"
        record = {"key": key_hash, **write_grids(out, teacher, students, solver, cfg["grids"]["n"],
                                                 cfg["grids"]["seed"])}
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    return {"status": status, "wall_s": time.time() - started, "files": record["files"],
            "teacher_ode_nfe": record["teacher_ode_nfe"], "l2_to_teacher_ode": record["l2_to_teacher_ode"]}
