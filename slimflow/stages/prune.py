"""Prune a flow student (the project's UNet) by channels, then recover it.

`prune_student(cfg)` (`slimflow prune --config ...`):
1. loads the student model file (annealed or distilled; a velocity network v(x, t));
2. prunes channels with Torch-Pruning (UNet-aware: the attention's NIN matrices go through `MatmulPruner`,
   GroupNorm groups stay whole, the output conv is kept; local ranking, which UNet skip concatenations need),
   either to a channel `ratio` or to a `macs_fraction` of the MACs; importance magnitude (l1/l2), lamp, random,
   or taylor from the flow-matching loss on the pairs, accumulated over timesteps (Diff-Pruning style);
3. writes `pruned.safetensors`: an ordinary model file whose sidecar records the unpruned config and the pruning
   history, which `teachers.zoo.load_model` replays (`teachers.pruned`), so sample, bench, export and distill read
   it unchanged;
4. recovers it (`recover.mode`): `one_step`: distillation from the unpruned student, D(z + v_p(z, t0),
   z + v_u(z, t0)) on fresh noise z (data-free; for one-step students); `flow`: the reflow loss on the pairs
   (for multi-step students); `none`. Training follows the stage recipe (`slimflow.stages.runner`) in
   `recover/`;
5. exports `recovered_ema.safetensors` and writes `summary.json`: params/MACs/latency before and after, the
   one-step distance to the unpruned student before and after recovery, and a grid of the three models.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pruning.measure import count_macs_params, measure_latency
from pruning.serialization import input_specs
from pruning.structured import GROUPNORM_MODES, IMPORTANCES, prune_structured, ratio_for_macs, width_attributes
from pruning.taylor import accumulate_gradients
from slimflow.checkpoint import content_hash, model_identity, read_model_file, require_writable, save_model, sha256_file
from slimflow.config import prefixed
from slimflow.engine import TRAIN_DEFAULTS, TRAIN_HELP, batch_indices, check_train_config, dist_info, resolve_device
from slimflow.flow import flow_matching_batch, noise_for
from slimflow.images import save_grid
from slimflow.losses import distance, l2
from slimflow.pairs import open_pairs, pairs_hash
from slimflow.sample import one_step_images, one_step_sampler
from slimflow.stages.runner import (
    TrainingJob,
    command_line,
    full_config,
    is_current,
    one_step_eval,
    plain_config,
    run_training,
    write_summary,
)
from teachers.pruned import example_inputs, unet_custom_pruners
from teachers.zoo import load_model

RECOVER_MODES = ("one_step", "flow", "none")
MACS_MATCH = ("at_most", "nearest")
KIND = "pruned-student"

DEFAULTS: dict = {
    "out": "runs/prune",
    "student": "runs/run/distill/distilled_ema.safetensors",  # a model file (or a training run directory)
    "pairs": None,  # pair store: read only by importance taylor and recover.mode flow
    "prune": {
        "importance": "l2",  # l1 | l2 | lamp | random | taylor
        "ratio": None,  # share of channels removed per layer; or, when None:
        # the smallest ratio whose pruning keeps at most this share of the MACs (macs_match: at_most), or the
        # ratio closest to it (nearest). groupnorm even: every GroupNorm group loses channels, so widths move in
        # quarters (student-m: 100%, 57%, 25% of the MACs); whole_groups: whole groups go, steps of 4 channels
        "macs_fraction": 0.5,
        "macs_match": "at_most",
        "groupnorm": "even",
        "steps": 1,
        "taylor": {"batches": 8, "batch_size": 32, "eps": 1e-3, "seed": 0},  # t from 1 to eps, one per batch
    },
    "recover": {
        "mode": "one_step",
        "distance": "l2",  # one_step: l2 | l1 | pseudo_huber | domain | lpips-vgg | lpips-alex (flow: l2)
        "options": {"_open": True},
        "train": {
            **copy.deepcopy(TRAIN_DEFAULTS),
            "steps": 500,
            "batch_size": 32,
            "lr": 3e-4,
            "warmup": 25,
            "ema": {"kind": "power", "decay": 0.999, "max_decay": 0.999},
            "ckpt_every": 100,
        },
    },
    "compare": {"n": 64, "seed": 0},  # noise of the grid and of the distance to the unpruned student
}

HELP: dict[str, str] = {  # what each setting means (`--help-config`; tests/test_help_config.py checks all have one)
    "out": "folder: pruned.safetensors, recover/, recovered_ema.safetensors, grids/, summary.json",
    "student": "the unpruned student: a model file or a training run directory",
    "pairs": "pair store: read only by importance taylor and recover.mode flow",
    "prune.importance": "channel ranking: l1 | l2 | lamp | random | taylor",
    "prune.ratio": "share of channels removed per layer (null: searched from macs_fraction)",
    "prune.macs_fraction": "keep at most this share of the MACs (used when ratio is null)",
    "prune.macs_match": "at_most (MACs <= macs_fraction) | nearest (the reachable MACs closest to it, either side)",
    "prune.groupnorm": "even (channels leave every GroupNorm group) | whole_groups (whole groups leave; finer widths)",
    "prune.steps": "pruning in this many steps to the final ratio",
    "prune.taylor.batches": "taylor: batches of flow-matching gradients, times from 1 down to eps",
    "prune.taylor.batch_size": "taylor: pairs per batch",
    "prune.taylor.eps": "taylor: the last (smallest) time",
    "prune.taylor.seed": "taylor: seed of the pairs' order",
    "recover.mode": "one_step (distil the unpruned student's one-step images, data-free) | flow (reflow on the pairs) | none",
    "recover.distance": "one_step: l2 | l1 | pseudo_huber | domain | lpips-vgg | lpips-alex (flow: l2)",
    "recover.options": "options of that distance",
    **prefixed(TRAIN_HELP, "recover.train."),
    "compare.n": "noises of the comparison grids and of the l2 to the unpruned student",
    "compare.seed": "seed of that noise (also of recovery's periodic evaluation)",
}


# ------------------------------------------------------------------------------------------ pure pieces
def taylor_batches(store, n_batches: int, batch_size: int, eps: float, seed: int):
    """Flow-matching batches from the pairs at times t = 1 … eps (one per batch, high t first, as Diff-Pruning
    runs from the low-noise end) for Taylor gradients."""
    for k, t in enumerate(torch.linspace(1.0, eps, n_batches)):
        z, x = store.batch(batch_indices(k, batch_size, len(store), seed))
        yield flow_matching_batch(z, x, torch.full((batch_size,), float(t)))


def flow_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return (model(batch["x_t"], batch["t"]) - batch["target"]).square().mean()


def one_step_recovery_loss(original: nn.Module, d: Callable, t0: float) -> Callable:
    """loss_fn(model, batch) for the engine: mean D(pruned one-step image, unpruned one-step image) on batch z."""

    def loss_fn(model, batch):
        with torch.no_grad():
            target = one_step_images(original, batch["z"], t0)
        return d(one_step_images(model, batch["z"], t0), target).mean()

    return loss_fn


# ------------------------------------------------------------------------------------------ stages
def check_config(cfg: dict) -> None:
    """Raise on any bad setting of a `prune` config (see DEFAULTS), before any work."""
    _check(full_config(DEFAULTS, cfg))


def _needs_pairs(cfg: dict) -> bool:
    return cfg["prune"]["importance"] == "taylor" or cfg["recover"]["mode"] == "flow"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(cfg: dict) -> None:
    p, r = cfg["prune"], cfg["recover"]
    if p["importance"] not in IMPORTANCES:
        raise ValueError(f"unknown prune.importance {p['importance']!r}; choose one of {', '.join(IMPORTANCES)}")
    if p["ratio"] is None and p["macs_fraction"] is None:
        raise ValueError("set prune.ratio (share of channels removed) or prune.macs_fraction (share of MACs kept)")
    ratio, fraction = p["ratio"], p["macs_fraction"]
    if ratio is not None and not (_is_number(ratio) and 0.0 <= ratio < 1.0):
        raise ValueError(f"prune.ratio (share of channels removed) must lie in [0, 1), got {ratio!r}")
    if fraction is not None and not (_is_number(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"prune.macs_fraction (share of MACs kept) must lie in (0, 1], got {fraction!r}")
    if p["macs_match"] not in MACS_MATCH:
        raise ValueError(f"prune.macs_match must be one of {', '.join(MACS_MATCH)}, got {p['macs_match']!r}")
    if p["groupnorm"] not in GROUPNORM_MODES:
        raise ValueError(f"prune.groupnorm must be one of {', '.join(GROUPNORM_MODES)}, got {p['groupnorm']!r}")
    if r["mode"] != "none":
        check_train_config(r["train"])
    if r["mode"] not in RECOVER_MODES:
        raise ValueError(f"unknown recover.mode {r['mode']!r}; choose one of {', '.join(RECOVER_MODES)}")
    if r["mode"] == "one_step":
        distance(r["distance"], **r["options"])  # an unknown distance or missing LPIPS weights stop here
    if _needs_pairs(cfg) and not cfg["pairs"]:
        raise ValueError(
            "prune.importance taylor and recover.mode flow read the pair store: set pairs= to one "
            "(slimflow pairs generate)"
        )


def prune_model(student: nn.Module, model_config: dict, prune_cfg: dict, store=None) -> tuple[nn.Module, dict]:
    """A pruned copy of `student` and the pruning report (ratio used, MACs/params before/after, history);
    `prune_cfg` is the config's prune section (keys it lacks take their defaults)."""
    prune_cfg = {**DEFAULTS["prune"], **prune_cfg}
    model = copy.deepcopy(student).float().train().requires_grad_(True)  # Torch-Pruning traces through autograd
    inputs = example_inputs(model_config)
    kwargs = {
        "importance": prune_cfg["importance"],
        "global_pruning": False,
        "custom_pruners": unet_custom_pruners(),
        "groupnorm": prune_cfg["groupnorm"],
    }
    ratio = prune_cfg["ratio"]
    if ratio is None:  # searched with l2 magnitude (the search prunes copies once, without gradients)
        nearest = prune_cfg["macs_match"] == "nearest"
        ratio = ratio_for_macs(
            model, inputs, prune_cfg["macs_fraction"], nearest=nearest, **{**kwargs, "importance": "l2"}
        )
    compute_gradients = None
    if prune_cfg["importance"] == "taylor":
        t = prune_cfg["taylor"]

        def compute_gradients(m):
            accumulate_gradients(
                m, flow_loss, taylor_batches(store, t["batches"], t["batch_size"], t["eps"], t["seed"])
            )

    report = prune_structured(
        model, inputs, ratio=ratio, steps=prune_cfg["steps"], compute_gradients=compute_gradients, **kwargs
    )
    report = {
        **report,
        "ratio": ratio,
        "example_inputs": input_specs(inputs),
        "width_attributes": width_attributes(model),
    }
    return model.eval(), report


def prune_student(cfg: dict, command: str | None = None) -> dict:
    """Prune and recover the student of `cfg` (see DEFAULTS) into `cfg.out`; returns and writes the summary."""
    cfg = full_config(DEFAULTS, cfg)
    _check(cfg)
    out = require_writable(cfg["out"])
    command = command_line(command)
    sidecar, _ = read_model_file(cfg["student"])
    if sidecar.get("pruning"):
        raise ValueError(f"{cfg['student']} is already pruned; prune the unpruned student (or recover this one)")
    store = open_pairs(cfg["pairs"]) if _needs_pairs(cfg) else None
    student = load_model(cfg["student"])
    source = {"file": str(cfg["student"]), "kind": sidecar.get("kind"), "sha256": model_identity(cfg["student"])}
    summary: dict = {"kind": KIND, "student": source, "out": str(out)}
    summary["prune"], pruned_path, record = _prune_stage(cfg, student, sidecar, source, store, command)
    if cfg["recover"]["mode"] != "none":
        summary["recover"] = _recover_stage(cfg, student, sidecar, pruned_path, record, store, command)
    summary["models"] = _compare_stage(cfg, student, sidecar, pruned_path)
    if dist_info()[0] == 0:
        write_summary(out, summary)
    return summary


def _file_meta(sidecar: dict) -> dict:
    """What a pruned or recovered file keeps from the student's sidecar."""
    return {
        "model": sidecar["model"],
        "time_convention": sidecar.get("time_convention"),
        "one_step_time": float(sidecar.get("one_step_time") or 0.0),
        "pairs": sidecar.get("pairs"),
    }


def _prune_stage(
    cfg: dict, student: nn.Module, sidecar: dict, source: dict, store, command: str
) -> tuple[dict, Path, dict]:
    """Write out/pruned.safetensors unless it was made from this student with these settings; returns the stage
    summary, the file and its pruning record."""
    path = Path(cfg["out"]) / "pruned.safetensors"
    key = content_hash([source["sha256"], cfg["prune"], store is not None and pairs_hash(store)])
    started = time.time()
    if is_current(path, key):
        status, record = "skipped", read_model_file(path)[0]["pruning"]
    else:
        pruned, report = prune_model(student, sidecar["model"], cfg["prune"], store)
        record = {
            "history": report.pop("history"),
            "example_inputs": report.pop("example_inputs"),
            "width_attributes": report.pop("width_attributes"),
            "unwrapped_parameters": report["unwrapped_parameters"],
            "report": report,
            "source": source,
        }
        save_model(
            path,
            pruned,
            {
                **_file_meta(sidecar),
                "pruning": record,
                "kind": KIND,
                "config": plain_config(cfg),
                "key": key,
                "command": command,
            },
        )
        status = "ran"
    report = record["report"]
    return (
        {
            "status": status,
            "seconds": time.time() - started,
            "file": str(path),
            **{
                k: report[k]
                for k in ("importance", "ratio", "steps", "params_before", "params_after", "macs_before", "macs_after")
            },
        },
        path,
        record,
    )


def _recovery_objective(r: dict, student: nn.Module, shape: tuple, t0: float, store) -> tuple[Callable, Callable]:
    """(make_batch, make_loss) of recovery mode `r["mode"]`: one_step distils the unpruned student's one-step
    images on fresh noise; flow retrains on the pairs."""
    batch_size, seed = r["train"]["batch_size"], r["train"]["seed"]
    if r["mode"] == "one_step":

        def make_loss(device):
            d = distance(r["distance"], **r["options"])
            d = d.to(device) if isinstance(d, nn.Module) else d
            return one_step_recovery_loss(student.to(device), d, t0)

        def make_batch(step, gen):
            return {"z": torch.randn((batch_size, *shape), generator=gen)}
    else:

        def make_loss(device):
            return flow_loss

        def make_batch(step, gen):
            z, x = store.batch(batch_indices(step, batch_size, len(store), seed))
            return flow_matching_batch(z, x, 1e-3 + (1 - 1e-3) * torch.rand(batch_size, generator=gen))

    return make_batch, make_loss


def _recover_stage(
    cfg: dict, student: nn.Module, sidecar: dict, pruned_path: Path, record: dict, store, command: str
) -> dict:
    """Train the pruned model in out/recover and export out/recovered_ema.safetensors by the stage recipe (skipped
    when that export was made from this pruned file with these settings)."""
    out, r = Path(cfg["out"]), cfg["recover"]
    recover_cfg = {**cfg, "pruned_sha256": sha256_file(pruned_path)}
    meta = _file_meta(sidecar)
    shape = tuple(example_inputs(sidecar["model"])[0].shape[1:])
    make_batch, make_loss = _recovery_objective(r, student, shape, meta["one_step_time"], store)

    def eval_data() -> tuple[torch.Tensor, torch.Tensor]:  # fixed noise (compare.seed), not a training draw
        z = noise_for(torch.arange(r["train"]["eval_n"]), cfg["compare"]["seed"], shape)
        device = next(student.parameters()).device
        with torch.no_grad():
            return z, one_step_images(student, z.to(device), meta["one_step_time"]).cpu()

    started = time.time()
    job = TrainingJob(
        # train settings at the top level, where the run directory allows steps/logging to change on resume
        out=out / "recover",
        export_dir=out,
        kind="recovered-" + KIND,
        export_name="recovered_ema.safetensors",
        run_config={
            **recover_cfg,
            "recover": {k: v for k, v in r.items() if k != "train"},
            "train": r["train"],
            "model": sidecar["model"],
            "pruning": record,
        },
        train=r["train"],
        build=lambda: load_model(pruned_path).train().requires_grad_(True),
        make_batch=make_batch,
        make_loss=make_loss,
        sample_fn=one_step_sampler(cfg["compare"]["n"], shape, cfg["compare"]["seed"]),
        eval_fn=one_step_eval("one_step_l2_to_unpruned", eval_data, meta["one_step_time"]),
        meta={
            "one_step_time": meta["one_step_time"],
            "pairs": meta["pairs"],
            "pruning": record,
            "recovered_from": str(pruned_path),
        },
        settings=recover_cfg,
    )
    result = run_training(job, command)
    return {
        "status": result["status"],
        "seconds": time.time() - started,
        "file": str(job.export),
        **{k: result.get(k) for k in ("steps", "img_per_s", "final")},
    }


def _compare_stage(cfg: dict, student: nn.Module, sidecar: dict, pruned_path: Path) -> dict:
    """Params, MACs, latency (batch 1) of the unpruned, pruned and recovered models, and the mean l2 of their
    one-step images to the unpruned student's on the same noise; grids of those images in out/grids."""
    out = Path(cfg["out"])
    device = resolve_device(cfg["recover"]["train"]["device"])
    inputs = tuple(x.to(device) for x in example_inputs(sidecar["model"]))
    z = noise_for(torch.arange(cfg["compare"]["n"]), cfg["compare"]["seed"], list(inputs[0].shape[1:])).to(device)
    models = {"unpruned": student, "pruned": load_model(pruned_path)}
    if cfg["recover"]["mode"] != "none":
        models["recovered"] = load_model(out / "recovered_ema.safetensors")
    t0 = _file_meta(sidecar)["one_step_time"]
    with torch.no_grad():
        images = {name: one_step_images(m.to(device).eval(), z, t0).cpu() for name, m in models.items()}
    rows = {}
    for name, m in models.items():
        macs, params = count_macs_params(m, inputs)
        rows[name] = {
            "params": params,
            "macs": macs,
            "latency_ms_b1": measure_latency(m, inputs, warmup=3, repeats=10),
            "l2_to_unpruned": l2(images[name], images["unpruned"]).mean().item(),
        }
        save_grid(images[name], out / "grids" / f"{name}.png")
    return rows
