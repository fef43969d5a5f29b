"""`run`: teacher → pairs → [the teacher pruned to a MACs budget] → anneal → distill → comparison grids, in one
folder. With `init_prune.macs_fraction` set, the student is the teacher channel-pruned to that share of its MACs
(slimflow.stages.prune, no recovery; in init/) instead of a small network from scratch (anneal.model).
`recipe: direct` (with init_prune) drops the anneal stage: distill trains the pruned teacher itself, with the
teacher as the frozen guide of its two-step term (docs/methods.md, "A student from the pruned teacher").

Run folder (`out`): config.yaml, pairs/ (the pair store, unless pairs.dir puts it elsewhere), anneal/ and distill/
(each: config.yaml, checkpoints/, tb/, samples/, the exported EMA model, summary.json), grids/ (teacher 1-step,
teacher many-step, annealed and distilled student 1-step, all from the same noise, and side_by_side.png), tb/ (the
grids), summary.json.
Each stage is skipped when its output is current, resumed from its checkpoints when partial
(slimflow.stages.runner).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from slimflow import config as cfglib
from slimflow.checkpoint import atomic_write_text, content_hash, require_writable, sha256_file
from slimflow.engine import barrier, check_train_config, dist_info, resolve_device
from slimflow.images import grid_image, save_grid
from slimflow.losses import distance, l2
from slimflow.pairs import store_status
from slimflow.sample import sample
from slimflow.stages import anneal as anneal_stage
from slimflow.stages import distill as distill_stage
from slimflow.stages import pairs as pairs_stage
from slimflow.stages import prune as prune_stage
from slimflow.stages.runner import (
    TEACHER_HINT,
    command_line,
    full_config,
    is_current,
    plain_config,
    read_summary,
    require_input,
    write_summary,
)
from teachers.zoo import load_model

DEFAULTS: dict = {
    "out": "runs/run",
    "teacher": pairs_stage.DEFAULTS["teacher"],
    "recipe": "reflow",  # reflow: anneal then distill | direct: distill the pruned teacher (init_prune), no anneal
    "teacher_resolution": None,  # image size of a reference DDPM++ .pth teacher (it does not record it)
    # pairs.dir: where the pair store lives (None: <out>/pairs); runs that name the same dir share one store
    "pairs": {
        "dir": None,
        **{
            k: copy.deepcopy(v)
            for k, v in pairs_stage.DEFAULTS.items()
            if k not in ("out", "teacher", "teacher_resolution")
        },
    },
    "anneal": {k: copy.deepcopy(v) for k, v in anneal_stage.DEFAULTS.items() if k not in ("out", "pairs", "teacher")},
    "distill": {
        k: copy.deepcopy(v)
        for k, v in distill_stage.DEFAULTS.items()
        if k not in ("out", "pairs", "teacher", "student")
    },
    "grids": {"n": 64, "seed": 0},  # the teacher's many-step grid uses the pairs' solver
    # the student from the pruned teacher (off while macs_fraction is None); taylor reads the run's pairs
    "init_prune": {
        "macs_fraction": None,
        "importance": "l2",
        "groupnorm": "whole_groups",
        "macs_match": "nearest",
        "round_to": None,
    },
}

HELP: dict[str, str] = {  # what each setting means (`--help-config`; tests/test_help_config.py checks all have one)
    "out": "run folder: pairs/, anneal/, distill/, grids/, tb/, config.yaml, summary.json",
    "recipe": "reflow: anneal then distill | direct: no anneal stage; distill trains the teacher pruned by init_prune, "
    "the teacher as its two-step guide (give distill.train.steps the images both stages would have had)",
    "teacher": pairs_stage.HELP["teacher"],
    "teacher_resolution": pairs_stage.HELP["teacher_resolution"],
    "pairs.dir": "where the pair store lives (null: <out>/pairs); runs that name the same dir share one store",
    **cfglib.prefixed(pairs_stage.HELP, "pairs.", drop=("out", "teacher", "teacher_resolution")),
    **cfglib.prefixed(anneal_stage.HELP, "anneal.", drop=("out", "pairs", "teacher")),
    **cfglib.prefixed(distill_stage.HELP, "distill.", drop=("out", "pairs", "teacher", "student")),
    "grids.n": "images in each comparison grid (teacher 1-step and many-step, annealed, distilled)",
    "grids.seed": "noise seed of the comparison grids",
    "init_prune.macs_fraction": "null: the student is anneal.model from scratch; a share: the student is the teacher "
    "channel-pruned to that share of its MACs (written to <out>/init/pruned.safetensors)",
    "init_prune.importance": prune_stage.HELP["prune.importance"],
    "init_prune.groupnorm": prune_stage.HELP["prune.groupnorm"],
    "init_prune.macs_match": prune_stage.HELP["prune.macs_match"],
    "init_prune.round_to": prune_stage.HELP["prune.round_to"],
}
GRIDS = ("teacher_1step", "teacher_ode", "annealed_1step", "distilled_1step")
RECIPES = ("reflow", "direct")


# ------------------------------------------------------------------------------------------------ grids
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


def write_grids(
    out: Path, teacher: torch.nn.Module, students: dict[str, Path], solver: dict, n: int, seed: int
) -> dict:
    """Grids of the teacher (1 step and its ODE with `solver`) and the students (1 step) from the noise of
    (seed, 0..n-1); PNGs, side_by_side.png and TensorBoard images under `out`, and each grid's mean l2 to the
    teacher's ODE images on the same noise."""
    from torch.utils.tensorboard import SummaryWriter

    device = next(teacher.parameters()).device
    shape = tuple(teacher.sample_shape)
    ode, nfe = sample(teacher, n, shape, seed=seed, **solver)
    grids = {"teacher_1step": sample(teacher, n, shape, method="euler", steps=1, seed=seed)[0], "teacher_ode": ode}
    for name, path in students.items():  # one-step generators, each at its own t0
        grids[name] = sample(load_model(path, device=device), n, shape, method="euler", steps=1, seed=seed)[0]
    titles = {
        "teacher_1step": "teacher, 1 step",
        "teacher_ode": f"teacher, {solver['method']} ({nfe:g} NFE)",
        "annealed_1step": "annealed student, 1 step",
        "distilled_1step": "distilled student, 1 step",
    }
    files = {name: str(save_grid(images, out / "grids" / f"{name}.png")) for name, images in grids.items()}
    files["side_by_side"] = str(side_by_side(grids, titles, out / "grids" / "side_by_side.png"))
    with SummaryWriter(str(out / "tb")) as writer:
        for name, images in grids.items():
            writer.add_image(f"grids/{name}", grid_image(images), 0)
    return {
        "files": files,
        "teacher_ode_nfe": nfe,
        "l2_to_teacher_ode": {
            name: l2(images, ode).mean().item() for name, images in grids.items() if name != "teacher_ode"
        },
    }


# ------------------------------------------------------------------------------------------------ run
def _train_stage(runner, cfg: dict, command: str) -> dict:
    """Run a training stage (it skips or resumes itself) and what the run summary keeps of its summary."""
    started = time.time()
    summary = runner(cfg, command=command)
    final = summary.get("final") or {}
    return {
        "status": summary["status"],
        "wall_s": time.time() - started,
        "params": summary.get("params"),
        "steps": summary.get("steps"),
        "img_per_s": summary.get("img_per_s"),
        "seconds_of_last_session": summary.get("seconds_this_session"),
        "final_losses": {
            k.removeprefix("train/"): v
            for k, v in final.items()
            if k in ("train/loss", "train/distill", "train/two_step", "train/beta")
        },
        "export": summary.get("export"),
    }


def _init_prune_settings(cfg: dict, out: Path, pairs_dir: Path) -> dict:
    """The prune-stage config that makes the student from the teacher (no recovery: anneal trains it)."""
    p = cfg["init_prune"]
    return {
        "out": str(out / "init"),
        "student": cfg["teacher"],
        "pairs": str(pairs_dir) if p["importance"] == "taylor" else None,
        "prune": {  # round_to only when set: the prune stage's key is then that of runs made before it existed
            **{k: p[k] for k in ("macs_fraction", "importance", "groupnorm", "macs_match")},
            **({"round_to": p["round_to"]} if p["round_to"] is not None else {}),
        },
        "recover": {"mode": "none"},
    }


def _init_prune_stage(cfg: dict, out: Path, pairs_dir: Path, command: str) -> dict:
    """Prune the teacher into <out>/init/pruned.safetensors (skipped when current); what the run summary keeps."""
    started = time.time()
    summary = prune_stage.prune_student(_init_prune_settings(cfg, out, pairs_dir), command)
    return {**summary["prune"], "wall_s": time.time() - started}


def _check_settings(cfg: dict) -> None:
    """Every stage's settings, and the weights its distances need, before any work (not after an hour of it)."""
    if cfg["recipe"] not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {cfg['recipe']!r}")
    if cfg["recipe"] == "direct" and cfg["init_prune"]["macs_fraction"] is None:
        raise ValueError(
            "recipe direct distills the teacher pruned to a MACs budget: set init_prune.macs_fraction "
            "(a student from scratch takes recipe reflow)"
        )
    if cfg["recipe"] == "direct" and cfg["teacher_resolution"] is not None:
        raise ValueError(
            "recipe direct loads the teacher file as the distill stage's guide, which needs a file that records its "
            "resolution; a reference checkpoint given with teacher_resolution takes recipe reflow"
        )
    if cfg["init_prune"]["macs_fraction"] is not None:
        if cfg["anneal"]["init"] or cfg["anneal"]["init_architecture"]:
            raise ValueError("init_prune makes the student from the teacher: leave anneal.init unset")
        prune_stage.check_config(_init_prune_settings(cfg, Path(cfg["out"]), Path("pairs")))
    pairs_stage.solver_kwargs(cfg["pairs"]["solver"])
    anneal_stage.anneal_loss(cfg["anneal"]["flow"])
    anneal_stage.check_anneal_config(cfg["anneal"])
    loss = cfg["distill"]["loss"]
    distill_stage.check_loss_config(loss)
    check_train_config(cfg["distill"]["train"])
    distance(loss["distance"], **loss["options"])


def check_config(cfg: dict) -> None:
    """Raise on any bad setting of a `run` config (see DEFAULTS) or a distance whose weights are missing."""
    _check_settings(full_config(DEFAULTS, cfg))


def _pairs_stage(cfg: dict, pairs_dir: Path) -> dict:
    """Generate (or resume, or find complete) the run's pair store; what the run summary keeps of it."""
    before = store_status(pairs_dir)
    settings = {k: v for k, v in cfg["pairs"].items() if k != "dir"}
    manifest = pairs_stage.generate_pairs_from_config(
        {**settings, "out": str(pairs_dir), "teacher": cfg["teacher"], "teacher_resolution": cfg["teacher_resolution"]}
    )
    return {
        "status": {"complete": "skipped", "running": "resumed"}.get(before, "ran"),
        "wall_s": manifest["seconds_this_session"],
        "count": manifest["count"],
        "solver": manifest["solver"],
        "pairs_per_s": manifest["pairs_per_s"],
        "nfe_per_pair": manifest["nfe_per_pair_mean"],
        "teacher_hash": manifest["teacher_hash"],
        "dir": str(pairs_dir),
    }


def run_pipeline(cfg: dict, command: str | None = None) -> dict:
    """pairs → anneal → distill → grids from the teacher file in `cfg` (see DEFAULTS) into `cfg.out`; writes and
    returns the summary (sizes, wall time per stage, pairs/s, NFE/pair, final losses, paths). `command` is recorded
    in the students' sidecars (default: this process's command line)."""
    command = command_line(command)
    cfg = full_config(DEFAULTS, cfg)
    _check_settings(cfg)
    out = require_writable(cfg["out"])
    if cfg["pairs"]["dir"]:
        require_writable(cfg["pairs"]["dir"])
    require_input(cfg["teacher"], "teacher file", TEACHER_HINT)
    teacher = load_model(cfg["teacher"], resolution=cfg["teacher_resolution"])
    began = time.time()
    stages: dict[str, dict] = {}

    pairs_dir = Path(cfg["pairs"]["dir"]) if cfg["pairs"]["dir"] else out / "pairs"
    stages["pairs"] = _pairs_stage(cfg, pairs_dir)
    # the stages re-check the store's teacher hash from the teacher file; a reference .pth needs its resolution
    # for that, which they do not take, and the store was made by this very teacher a moment ago
    checked_teacher = cfg["teacher"] if cfg["teacher_resolution"] is None else None

    if cfg["init_prune"]["macs_fraction"] is not None:
        stages["init_prune"] = _init_prune_stage(cfg, out, pairs_dir, f"{command} (stage init_prune)")
    distill_cfg = {**cfg["distill"], "out": str(out / "distill"), "pairs": str(pairs_dir), "teacher": checked_teacher}
    students = {}
    if cfg["recipe"] == "direct":  # the pruned teacher is the student's start, the teacher its guide
        distill_cfg.update(student=stages["init_prune"]["file"], guide=cfg["teacher"])
    else:
        anneal_cfg = {**cfg["anneal"], "out": str(out / "anneal"), "pairs": str(pairs_dir), "teacher": checked_teacher}
        if "init_prune" in stages:
            anneal_cfg.update(init=stages["init_prune"]["file"], init_architecture=True)
        stages["anneal"] = _train_stage(anneal_stage.anneal, anneal_cfg, f"{command} (stage anneal)")
        students["annealed_1step"] = Path(stages["anneal"]["export"])
        distill_cfg["student"] = str(students["annealed_1step"])
    stages["distill"] = _train_stage(distill_stage.distill, distill_cfg, f"{command} (stage distill)")
    students["distilled_1step"] = Path(stages["distill"]["export"])

    summary = None
    if dist_info()[0] == 0:
        teacher = teacher.to(resolve_device(cfg["pairs"]["device"]))
        stages["grids"] = _grids_stage(out, cfg, teacher, students)
        summary = {
            "out": str(out),
            "config": str(out / "config.yaml"),
            "teacher": cfg["teacher"],
            "params": {
                "teacher": sum(p.numel() for p in teacher.parameters()),
                "annealed": stages["anneal"]["params"] if "anneal" in stages else None,
                "distilled": stages["distill"]["params"],
            },
            "stages": stages,
            "wall_s_this_call": time.time() - began,
            "torch_threads": torch.get_num_threads(),
        }
        cfglib.dump(plain_config(cfg), out / "config.yaml")  # the settings the outputs in `out` were made with
        write_summary(out, summary)
    barrier()
    return summary or read_summary(out)


def _grids_stage(out: Path, cfg: dict, teacher: torch.nn.Module, students: dict[str, Path]) -> dict:
    """Grids unless grids/grids.json was made from the same teacher, students, solver and grid settings."""
    started = time.time()
    solver = pairs_stage.solver_kwargs(cfg["pairs"]["solver"])
    key = content_hash(
        {
            "teacher": content_hash(teacher),
            "solver": solver,
            "grids": cfg["grids"],
            **{name: sha256_file(path) for name, path in students.items()},
        }
    )
    record_path = out / "grids" / "grids.json"
    current = is_current(record_path, key)
    record = json.loads(record_path.read_text()) if current else None
    status = "skipped"
    if not current or not all(Path(f).is_file() for f in record["files"].values()):
        status = "ran"
        record = {"key": key, **write_grids(out, teacher, students, solver, cfg["grids"]["n"], cfg["grids"]["seed"])}
        atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
    return {
        "status": status,
        "wall_s": time.time() - started,
        "files": record["files"],
        "teacher_ode_nfe": record["teacher_ode_nfe"],
        "l2_to_teacher_ode": record["l2_to_teacher_ode"],
    }
