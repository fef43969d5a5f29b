"""Prune a flow student (the project's UNet) by channels, then by weights, recovering it after each cut.

`prune_student(cfg)` (`slimflow prune --config ...`):
1. loads the student model file (annealed or distilled; a velocity network v(x, t));
2. prunes channels with Torch-Pruning (UNet-aware: the attention's NIN matrices go through `MatmulPruner`,
   GroupNorm groups stay whole, the output conv is kept; local ranking, which UNet skip concatenations need;
   with `prune.groupnorm: ...+regroup` a GroupNorm whose groups a skip concatenation straddles, as in DDPM++ from
   128 channels on, gets a new group count instead, listed in the report as `regrouped_groupnorms`),
   either to a channel `ratio` or to a `macs_fraction` of the MACs (one ratio for all layers, or with
   `macs_match: *_per_layer` then whole groups one at a time from the widest layer, `pruning.plan_for_macs`,
   which lands within 10% of the budget where one ratio can miss it); importance magnitude (l1/l2), lamp, random,
   or taylor from the flow-matching loss on the pairs, accumulated over timesteps (Diff-Pruning style);
3. writes `pruned.safetensors`: an ordinary model file whose sidecar records the unpruned config and the pruning
   history, which `teachers.zoo.load_model` replays (`teachers.pruned`), so sample, bench, export and distill read
   it unchanged;
4. recovers it (`recover.mode`): `one_step`: distillation from the unpruned student, D(z + v_p(z, t0),
   z + v_u(z, t0)) on fresh noise z (data-free; for one-step students); `flow`: the reflow loss on the pairs
   (for multi-step students); `distill`: the distill stage's flow-guided distillation loss on the pairs, the
   unpruned student as the frozen guide; `none`. With `prune.schedule` (decreasing MACs shares) steps 2-4 repeat
   per share in `channels/cycle_<k>/`, each cycle pruning the previous one's recovered model and recovering for its
   share of the steps (progressive pruning). Training follows the stage recipe (`slimflow.stages.runner`) in
   `recover/`;
5. exports `recovered_ema.safetensors`;
6. weight sparsity (`sparsity`, optional, after the channels or instead of them with `prune.channels: false`):
   one cycle per target in `sparsity.targets` (overall share of zero Conv/Linear weights), each removing weights
   by magnitude, a share `sparsity.ap_fraction` of them by AP (the surviving negative weights that changed least
   over the last training phase), then recovering as in 4; or one cycle of 2:4 masks (`sparsity.pattern`). The
   masks live in the model (`pruning.attach_masks`): they are held through recovery, saved in the model file and
   re-applied on load. Cycle k writes `sparsity/cycle_<k>/masked.safetensors`, its recovery
   `sparsity/cycle_<k>/recover/` and `sparsity/cycle_<k>/recovered_ema.safetensors`;
7. writes `summary.json`: params (and non-zero params), MACs, latency, file size (raw, deflated, and as bitmask +
   non-zero values), the one-step distance to the unpruned student and the dead-neuron rate (overall and per SiLU)
   of every model made, and a grid of each. Recovery logs the DNR to TensorBoard with its periodic evaluation.
"""

from __future__ import annotations

import copy
import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pruning.dnr import DeadNeuronMonitor
from pruning.measure import count_macs_params, measure_latency
from pruning.serialization import input_specs
from pruning.structured import (
    GROUPNORM_MODES,
    IMPORTANCES,
    plan_for_macs,
    prune_structured,
    ratio_for_macs,
    width_attributes,
)
from pruning.taylor import accumulate_gradients
from pruning.unstructured import (
    SCOPES,
    WeightMasks,
    attach_masks,
    cycle_rate,
    masks_of,
    n_of_m_masks,
    prune_cycle,
    sparse_storage_bytes,
)
from slimflow.checkpoint import content_hash, model_identity, read_model_file, require_writable, save_model, sha256_file
from slimflow.config import prefixed
from slimflow.engine import TRAIN_DEFAULTS, TRAIN_HELP, batch_indices, check_train_config, dist_info, resolve_device
from slimflow.flow import flow_matching_batch, noise_for
from slimflow.images import save_grid
from slimflow.losses import distance, l2
from slimflow.pairs import open_pairs, pairs_hash
from slimflow.sample import conditioned, num_classes, one_step_images, one_step_sampler, resolve_labels
from slimflow.stages import distill as distill_stage
from slimflow.stages.runner import (
    TrainingJob,
    check_student_classes,
    command_line,
    full_config,
    is_current,
    one_step_eval,
    plain_config,
    read_summary,
    run_training,
    write_summary,
)
from teachers.pruned import example_inputs, unet_custom_pruners, unet_ignored_layers
from teachers.zoo import load_model

RECOVER_MODES = ("one_step", "flow", "distill", "none")
MACS_MATCH = ("at_most", "nearest", "at_most_per_layer", "nearest_per_layer")  # *_per_layer: plan_for_macs
PATTERNS = ("unstructured", "2:4")
KIND = "pruned-student"
SPARSE_KIND = "sparse-student"

DEFAULTS: dict = {
    "out": "runs/prune",
    "student": "runs/run/distill/distilled_ema.safetensors",  # a model file (or a training run directory)
    "pairs": None,  # pair store: read only by importance taylor and recover.mode flow
    "prune": {
        "channels": True,  # False: no channel pruning (e.g. weight sparsity only)
        "importance": "l2",  # l1 | l2 | lamp | random | taylor
        "ratio": None,  # share of channels removed per layer; or, when None:
        # the smallest ratio whose pruning keeps at most this share of the MACs (macs_match: at_most), or the
        # ratio closest to it (nearest). groupnorm even: every GroupNorm group loses channels, so widths move in
        # quarters (student-m: 100%, 57%, 25% of the MACs); whole_groups: whole groups go, steps of 4 channels;
        # at_most_per_layer / nearest_per_layer (whole_groups): then one group at a time from the widest layer
        "macs_fraction": 0.5,
        "macs_match": "at_most",
        "groupnorm": "even",
        "steps": 1,
        "round_to": None,  # whole_groups: layers lose multiples of this many channels (8: widths stay multiples of 8)
        "schedule": [],  # progressive: e.g. [0.6, 0.4, 0.32], a prune + recovery cycle per share (not in keys while [])
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
    "sparsity": {  # weight pruning after the channels, one cycle (prune, then recover) per target
        "targets": [],  # e.g. [0.5, 0.8, 0.9]: overall shares of zero Conv/Linear weights
        "pattern": "unstructured",  # or 2:4 (one cycle, targets empty)
        "ap_fraction": 0.0,  # share of each cycle's removals chosen by AP
        "scope": "global",
        "ap_reference": None,  # model file: the student's weights when its last training began (AP, cycle 1)
        "dnr_threshold": 0.0,
    },
    "compare": {"n": 64, "seed": 0},  # noise of the grid and of the distance to the unpruned student
}

HELP: dict[str, str] = {  # what each setting means (`--help-config`; tests/test_help_config.py checks all have one)
    "out": "folder: pruned.safetensors, recover/, recovered_ema.safetensors, grids/, summary.json",
    "student": "the unpruned student: a model file or a training run directory",
    "pairs": "pair store: read only by importance taylor and recover.mode flow",
    "prune.channels": "prune channels (false: keep them, e.g. for weight sparsity alone)",
    "prune.importance": "channel ranking: l1 | l2 | lamp | random | taylor",
    "prune.ratio": "share of channels removed per layer (null: searched from macs_fraction)",
    "prune.macs_fraction": "keep at most this share of the MACs (used when ratio is null)",
    "prune.round_to": "groupnorm whole_groups: each layer loses a multiple of this many channels, so widths that are"
    " multiples of it stay so (8 on the teacher at 18.2%: same MACs, -16% CPU time per image at batch 64, none at"
    " batch 1; null: one group at a time)",
    "prune.schedule": "progressive pruning instead of macs_fraction: decreasing shares of the unpruned MACs, e.g."
    " [0.6, 0.4, 0.32]; one cycle each (prune to it, then recover with its share of recover.train.steps) in"
    " channels/cycle_<k>/ ([]: one-shot)",
    "prune.macs_match": "at_most (MACs <= macs_fraction) | nearest (the reachable MACs closest to it, either side),"
    " one ratio for all layers | at_most_per_layer | nearest_per_layer: then whole groups one at a time from the layer"
    " keeping the largest share of its width (groupnorm whole_groups; within 10% of the budget)",
    "prune.groupnorm": "even (channels leave every GroupNorm group) | whole_groups (whole groups leave; finer widths);"
    " +regroup on either: a GroupNorm a skip concat straddles gets a new group count (DDPM++ from 128 channels)",
    "prune.steps": "pruning in this many steps to the final ratio",
    "prune.taylor.batches": "taylor: batches of flow-matching gradients, times from 1 down to eps",
    "prune.taylor.batch_size": "taylor: pairs per batch",
    "prune.taylor.eps": "taylor: the last (smallest) time",
    "prune.taylor.seed": "taylor: seed of the pairs' order",
    "recover.mode": "one_step (distil the unpruned student's one-step images, data-free) | flow (reflow on the pairs)"
    " | distill (flow-guided distillation on the teacher's pairs, the unpruned student as the frozen guide) | none",
    "recover.distance": "one_step, distill: l2 | l1 | pseudo_huber | domain | lpips-vgg | lpips-alex (flow: l2)",
    "recover.options": "options of that distance",
    **prefixed(TRAIN_HELP, "recover.train."),
    "sparsity.targets": "overall weight sparsities (shares of zero Conv/Linear weights), one cycle + recovery each",
    "sparsity.pattern": "unstructured (by targets) | 2:4 (one cycle: 2 of every 4 input weights kept)",
    "sparsity.ap_fraction": "AP's share of each cycle's removals: surviving negative weights that changed least",
    "sparsity.scope": "global (|w| over all layers) | layer (each layer loses the same share) | lamp (LAMP scores over all layers)",
    "sparsity.ap_reference": "AP in cycle 1: the student's weights when its last training began (a model file)",
    "sparsity.dnr_threshold": "a SiLU unit counts as dead when its pre-activation is at most this",
    "compare.n": "noises of the comparison grids and of the l2 to the unpruned student",
    "compare.seed": "seed of that noise (also of recovery's periodic evaluation)",
}


# ------------------------------------------------------------------------------------------ pure pieces
def pairs_flow_batch(store, index: torch.Tensor, t: torch.Tensor) -> dict:
    """The flow-matching batch of pairs `index` at times t, with the pairs' labels for a class-conditional store."""
    batch = flow_matching_batch(*store.batch(index), t)
    labels = store.labels(index)
    return batch if labels is None else {**batch, "labels": labels}


def taylor_batches(store, n_batches: int, batch_size: int, eps: float, seed: int):
    """Flow-matching batches from the pairs at times t = 1 … eps (one per batch, high t first, as Diff-Pruning
    runs from the low-noise end) for Taylor gradients."""
    for k, t in enumerate(torch.linspace(1.0, eps, n_batches)):
        yield pairs_flow_batch(
            store, batch_indices(k, batch_size, len(store), seed), torch.full((batch_size,), float(t))
        )


def flow_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return (conditioned(model, batch.get("labels"))(batch["x_t"], batch["t"]) - batch["target"]).square().mean()


def one_step_recovery_loss(original: nn.Module, d: Callable, t0: float) -> Callable:
    """loss_fn(model, batch) for the engine: mean D(pruned one-step image, unpruned one-step image) on batch z
    (under batch labels, for a class-conditional student)."""

    def loss_fn(model, batch):
        labels = batch.get("labels")
        with torch.no_grad():
            target = one_step_images(original, batch["z"], t0, labels)
        return d(one_step_images(model, batch["z"], t0, labels), target).mean()

    return loss_fn


# ------------------------------------------------------------------------------------------ stages
def check_config(cfg: dict) -> None:
    """Raise on any bad setting of a `prune` config (see DEFAULTS), before any work."""
    _check(full_config(DEFAULTS, cfg))


def _needs_pairs(cfg: dict) -> bool:
    taylor = cfg["prune"]["channels"] and cfg["prune"]["importance"] == "taylor"
    return taylor or cfg["recover"]["mode"] in ("flow", "distill")


def channel_schedule(p: dict) -> list[float] | None:
    """The MACs fractions of progressive channel pruning (`prune.schedule`), else None (one-shot)."""
    return list(p["schedule"]) if p["schedule"] else None


def keyed_prune_settings(p: dict) -> dict:
    """The prune section as stage keys and run directories record it: without `schedule` and `round_to` while they
    have their defaults, so configs written before they existed keep their keys and resume."""
    return {k: v for k, v in p.items() if not ((k == "schedule" and v == []) or (k == "round_to" and v is None))}


def cycle_steps(total: int, cycles: int) -> list[int]:
    """Recovery steps of each of `cycles` cycles: `total` split as evenly as whole steps allow (they sum to it, so
    progressive and one-shot runs configured alike train on as many images)."""
    return [total * k // cycles - total * (k - 1) // cycles for k in range(1, cycles + 1)]


def sparsity_plan(s: dict) -> list:
    """The cycles of the `sparsity` section: its targets, or the one n:m pattern."""
    return list(s["targets"]) if s["pattern"] == "unstructured" else [s["pattern"]]


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
    if p["schedule"] != []:
        _check_schedule(cfg)
    if p["round_to"] is not None:
        if not (isinstance(p["round_to"], int) and not isinstance(p["round_to"], bool) and p["round_to"] >= 1):
            raise ValueError(f"prune.round_to must be a positive number of channels or null, got {p['round_to']!r}")
        if not p["groupnorm"].startswith("whole_groups"):
            raise ValueError(
                "prune.round_to needs prune.groupnorm whole_groups (Torch-Pruning's rounding prunes nothing with "
                f"GroupNorm in even mode), got {p['groupnorm']!r}"
            )
    if p["macs_match"] not in MACS_MATCH:
        raise ValueError(f"prune.macs_match must be one of {', '.join(MACS_MATCH)}, got {p['macs_match']!r}")
    if p["groupnorm"] not in GROUPNORM_MODES:
        raise ValueError(f"prune.groupnorm must be one of {', '.join(GROUPNORM_MODES)}, got {p['groupnorm']!r}")
    if p["macs_match"].endswith("_per_layer") and not p["groupnorm"].startswith("whole_groups"):
        raise ValueError(
            f"prune.macs_match {p['macs_match']} removes whole GroupNorm groups one layer at a time: set "
            f"prune.groupnorm to whole_groups (or whole_groups+regroup), got {p['groupnorm']!r}"
        )
    if r["mode"] != "none":
        check_train_config(r["train"])
    if r["mode"] not in RECOVER_MODES:
        raise ValueError(f"unknown recover.mode {r['mode']!r}; choose one of {', '.join(RECOVER_MODES)}")
    if r["mode"] in ("one_step", "distill"):
        distance(r["distance"], **r["options"])  # an unknown distance or missing LPIPS weights stop here
    if r["mode"] == "distill":
        distill_stage.check_loss_config(_distill_loss_config(r, 0.0))
    _check_sparsity(cfg)
    if _needs_pairs(cfg) and not cfg["pairs"]:
        raise ValueError(
            "prune.importance taylor and recover.mode flow or distill read the pair store: set pairs= to one "
            "(slimflow pairs generate)"
        )


def _check_schedule(cfg: dict) -> None:
    """A progressive schedule: shares of the unpruned MACs in (0, 1], strictly decreasing, found by search."""
    p = cfg["prune"]
    schedule = p["schedule"]
    if not (isinstance(schedule, list) and schedule and all(_is_number(f) for f in schedule)):
        raise ValueError(f"prune.schedule must be a list of numbers ([] for one-shot pruning), got {schedule!r}")
    bad = [f for f in schedule if not 0.0 < f <= 1.0]
    if bad:
        raise ValueError(f"prune.schedule entries are shares of the unpruned MACs, in (0, 1]; got {bad}")
    if any(b >= a for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"prune.schedule must decrease strictly (each cycle prunes more), got {schedule}")
    if p["ratio"] is not None:
        raise ValueError("prune.schedule sets each cycle's MACs budget: leave prune.ratio null")
    if not p["channels"]:
        raise ValueError("prune.schedule prunes channels: set prune.channels true")
    if cfg["recover"]["mode"] != "none" and cfg["recover"]["train"]["steps"] < len(schedule):
        raise ValueError(
            f"recover.train.steps ({cfg['recover']['train']['steps']}) is shared by the {len(schedule)} cycles: give "
            "each at least one step"
        )


def _check_sparsity(cfg: dict) -> None:
    s = cfg["sparsity"]
    if not isinstance(cfg["prune"]["channels"], bool):
        raise ValueError(f"prune.channels must be true or false, got {cfg['prune']['channels']!r}")
    if s["pattern"] not in PATTERNS:
        raise ValueError(f"sparsity.pattern must be one of {', '.join(PATTERNS)}, got {s['pattern']!r}")
    targets = s["targets"]
    if not isinstance(targets, list) or not all(_is_number(t) for t in targets):
        raise ValueError(f"sparsity.targets must be a list of numbers, got {targets!r}")
    bad = [t for t in targets if not 0.0 < t < 1.0]
    if bad:
        raise ValueError(f"sparsity.targets are shares of zero weights and must lie in (0, 1), got {bad}")
    if sorted(set(targets)) != targets:
        raise ValueError(f"sparsity.targets must increase strictly (each cycle removes more), got {targets}")
    if s["pattern"] != "unstructured" and targets:
        raise ValueError(f"sparsity.pattern {s['pattern']} makes one cycle of its own: leave sparsity.targets empty")
    if not (_is_number(s["ap_fraction"]) and 0.0 <= s["ap_fraction"] <= 1.0):
        raise ValueError(
            f"sparsity.ap_fraction is a share of each cycle's removals, in [0, 1]; got {s['ap_fraction']!r}"
        )
    if s["scope"] not in SCOPES:
        raise ValueError(f"sparsity.scope must be one of {', '.join(SCOPES)}, got {s['scope']!r}")
    if s["ap_reference"] is not None and not Path(s["ap_reference"]).exists():
        raise FileNotFoundError(f"sparsity.ap_reference {s['ap_reference']!r} does not exist")
    if not (cfg["prune"]["channels"] or sparsity_plan(s)):
        raise ValueError("nothing to prune: prune.channels is false and sparsity.targets is empty")


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
        "ignored_layers": unet_ignored_layers(model_config),
        "groupnorm": prune_cfg["groupnorm"],
        **({"round_to": prune_cfg["round_to"]} if prune_cfg["round_to"] is not None else {}),
    }
    ratio, extra_blocks, match = prune_cfg["ratio"], 0, prune_cfg["macs_match"]
    if ratio is None and match.endswith("_per_layer"):  # widths only: the same plan under any importance
        plan = plan_for_macs(
            model,
            inputs,
            prune_cfg["macs_fraction"],
            nearest=match.startswith("nearest"),
            **{**kwargs, "importance": "l2"},
        )
        ratio, extra_blocks = plan.ratio, plan.extra_blocks
    elif ratio is None:  # searched with l2 magnitude (the search prunes copies once, without gradients)
        nearest = match == "nearest"
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
        model,
        inputs,
        ratio=ratio,
        steps=prune_cfg["steps"],
        compute_gradients=compute_gradients,
        extra_blocks=extra_blocks,
        **kwargs,
    )
    report = {
        **report,
        "ratio": ratio,
        **({"extra_blocks": extra_blocks} if prune_cfg["ratio"] is None and match.endswith("_per_layer") else {}),
        "example_inputs": input_specs(inputs),
        "width_attributes": width_attributes(model),
    }
    return model.eval(), report


def prune_student(cfg: dict, command: str | None = None) -> dict:
    """Prune and recover the student of `cfg` (see DEFAULTS) into `cfg.out`; returns and writes the summary."""
    cfg = full_config(DEFAULTS, cfg)
    _check(cfg)
    out = require_writable(cfg["out"])
    earlier = read_summary(out)
    command = command_line(command)
    sidecar, _ = read_model_file(cfg["student"])
    if sidecar.get("pruning") and cfg["prune"]["channels"]:
        raise ValueError(
            f"{cfg['student']} is already pruned; prune the unpruned student (or recover this one, or give it "
            "weight sparsity alone with prune.channels: false)"
        )
    if sidecar.get("weight_masks"):
        raise ValueError(f"{cfg['student']} is already sparse (it has weight masks); prune the dense student")
    store = open_pairs(cfg["pairs"]) if _needs_pairs(cfg) else None
    student = load_model(cfg["student"])
    if store is not None:
        check_student_classes(num_classes(student), store, f"the student {cfg['student']}")
    source = {"file": str(cfg["student"]), "kind": sidecar.get("kind"), "sha256": model_identity(cfg["student"])}
    summary: dict = {"kind": KIND, "student": source, "out": str(out)}
    models = {"unpruned": Path(cfg["student"])}
    # the last training phase (start file, end file) and the model the weight cycles start from
    phase = (cfg["sparsity"]["ap_reference"], cfg["student"]) if cfg["sparsity"]["ap_reference"] else None
    if channel_schedule(cfg["prune"]):
        summary["channels"] = _progressive_stage(cfg, student, sidecar, source, store, command)
        phase = None
        for cycle in summary["channels"]["cycles"]:
            models[cycle["name"] + "-pruned"] = Path(cycle["pruned_file"])
            if "recover" in cycle:
                phase = (Path(cycle["pruned_file"]), Path(cycle["file"]))
                models[cycle["name"]] = Path(cycle["file"])
    elif cfg["prune"]["channels"]:
        summary["prune"], models["pruned"] = _prune_stage(cfg, student, sidecar, source, store, command)
        phase = None
        if cfg["recover"]["mode"] != "none":
            summary["recover"] = _recover_stage(cfg, student, models["pruned"], out, store, command)
            models["recovered"] = out / "recovered_ema.safetensors"
            phase = (models["pruned"], models["recovered"])
    if sparsity_plan(cfg["sparsity"]):
        summary["sparsity"] = _sparsity_stage(cfg, student, list(models.values())[-1], phase, store, command)
        for cycle in summary["sparsity"]["cycles"]:
            if "recover" in cycle:
                models[cycle["name"] + "-before-recovery"] = Path(cycle["masked_file"])
            models[cycle["name"]] = Path(cycle["file"])
    summary["models"] = _compare_stage(cfg, student, sidecar, models)
    keep_earlier_seconds(summary, earlier)
    if dist_info()[0] == 0:
        write_summary(out, summary)
    return summary


def keep_earlier_seconds(summary: dict, earlier: dict) -> None:
    """A skipped stage reports the seconds it took when it ran (from the summary.json of that call), not the
    moments of the skip, which become `seconds_this_call`: prune and recover, and each progressive or sparsity
    cycle's cut and recovery (cycles matched by name)."""
    parts = [(summary.get(name), earlier.get(name)) for name in ("prune", "recover")]
    for group in ("channels", "sparsity"):
        before = {c.get("name"): c for c in (earlier.get(group) or {}).get("cycles", [])}
        for cycle in (summary.get(group) or {}).get("cycles", []):
            old = before.get(cycle.get("name")) or {}
            parts += [(cycle, old), (cycle.get("recover"), old.get("recover"))]
    for now, before in parts:
        if now and now.get("status") == "skipped" and "seconds" in (before or {}):
            now["seconds_this_call"], now["seconds"] = now["seconds"], before["seconds"]


def format_result(summary: dict) -> str:
    """What `slimflow prune` prints: the summary as JSON without the per-layer dead-neuron rates (those are in
    out/summary.json and TensorBoard)."""

    def short(value):
        if isinstance(value, dict):
            return {k: short(v) for k, v in value.items() if k != "dnr_layers" and not k.startswith("eval/dnr/")}
        return [short(v) for v in value] if isinstance(value, list) else value

    return json.dumps(short(summary), indent=1, default=str)


def _file_meta(sidecar: dict) -> dict:
    """What a pruned or recovered file keeps from the student's sidecar."""
    return {
        "model": sidecar["model"],
        "time_convention": sidecar.get("time_convention"),
        "one_step_time": float(sidecar.get("one_step_time") or 0.0),
        "pairs": sidecar.get("pairs"),
    }


def _prune_stage(cfg: dict, student: nn.Module, sidecar: dict, source: dict, store, command: str) -> tuple[dict, Path]:
    """Write out/pruned.safetensors unless it was made from this student with these settings; returns the stage
    summary and the file."""
    path = Path(cfg["out"]) / "pruned.safetensors"
    key = content_hash([source["sha256"], keyed_prune_settings(cfg["prune"]), store is not None and pairs_hash(store)])
    started = time.time()
    if is_current(path, key):
        status, record = "skipped", read_model_file(path)[0]["pruning"]
    else:
        pruned, report = prune_model(student, sidecar["model"], cfg["prune"], store)
        record = _save_pruned(path, pruned, report, [], cfg, sidecar, source, key, command)
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
            **({"extra_blocks": report["extra_blocks"]} if "extra_blocks" in report else {}),
            "regrouped_groupnorms": report.get("regrouped_groupnorms", {}),
        },
        path,
    )


def _progressive_stage(cfg: dict, student: nn.Module, sidecar: dict, source: dict, store, command: str) -> dict:
    """Progressive channel pruning: cycle k prunes the model of cycle k − 1 (first: the student) to the k-th share
    of the unpruned student's MACs in `prune.schedule` and recovers it with its share of recover.train.steps
    (`cycle_steps`), in out/channels/cycle_<k>/ (pruned.safetensors, recover/, recovered_ema.safetensors). Each
    cycle is skipped when current and its recovery resumes from its checkpoints, as the sparsity cycles do."""
    schedule, r = channel_schedule(cfg["prune"]), cfg["recover"]
    steps = cycle_steps(r["train"]["steps"], len(schedule))
    base = count_macs_params(student, example_inputs(sidecar["model"]))[0]
    current, cycles = Path(cfg["student"]), []
    for k, fraction in enumerate(schedule, 1):
        folder = Path(cfg["out"]) / "channels" / f"cycle_{k}"
        started = time.time()
        pruned, report, status = _prune_cycle(cfg, sidecar, source, current, fraction, base, folder, store, command)
        cycle = {
            "name": f"channels-{100 * fraction:g}%",
            "macs_fraction": fraction,
            "reached": report["macs_after"] / base,
            "status": status,
            "seconds": time.time() - started,
            **{k: report.get(k) for k in ("ratio", "extra_blocks", "params_after", "macs_after")},
            "pruned_file": str(pruned),
        }
        current = pruned
        if r["mode"] != "none":
            cycle_cfg = {**cfg, "recover": {**r, "train": {**r["train"], "steps": steps[k - 1]}}}
            cycle["recover"] = _recover_stage(cycle_cfg, student, pruned, folder, store, command)
            current = folder / "recovered_ema.safetensors"
        cycles.append({**cycle, "file": str(current)})
    return {"cycles": cycles, "recovery_steps": steps, "final": str(current)}


def _prune_cycle(
    cfg: dict, sidecar: dict, source: dict, start: Path, fraction: float, base: int, folder: Path, store, command: str
) -> tuple[Path, dict, str]:
    """Write folder/pruned.safetensors: the model at `start` (the student or an earlier cycle's) pruned to
    `fraction` of the unpruned student's `base` MACs, its pruning record the earlier history followed by this
    cycle's (so it replays on the unpruned architecture); skipped when made from the same inputs."""
    path = folder / "pruned.safetensors"
    key = content_hash(
        [source["sha256"], cfg["prune"], model_identity(start), fraction, store is not None and pairs_hash(store)]
    )
    if is_current(path, key):
        return path, read_model_file(path)[0]["pruning"]["report"], "skipped"
    model = load_model(start)
    earlier = read_model_file(start)[0].get("pruning") or {}
    macs = count_macs_params(model, example_inputs(sidecar["model"]))[0]
    if macs <= fraction * base:
        raise ValueError(
            f"cycle to {fraction:g} of the MACs: {start} keeps {macs / base:.4f} of them already; make the schedule "
            "decrease faster or use prune.macs_match nearest / *_per_layer"
        )
    pruned, report = prune_model(
        model, sidecar["model"], {**cfg["prune"], "macs_fraction": fraction * base / macs}, store
    )
    report["macs_fraction_of_unpruned"] = report["macs_after"] / base
    _save_pruned(path, pruned, report, earlier.get("history", []), cfg, sidecar, source, key, command)
    return path, report, "ran"


def _save_pruned(
    path: Path,
    pruned: nn.Module,
    report: dict,
    earlier_history: list,
    cfg: dict,
    sidecar: dict,
    source: dict,
    key: str,
    command: str,
) -> dict:
    """Save a channel-pruned model with its pruning record (`earlier_history` followed by this cut's, so the file
    replays on the unpruned architecture); returns the record. Takes the history and trace inputs out of `report`."""
    record = {
        "history": [*earlier_history, *report.pop("history")],
        "example_inputs": report.pop("example_inputs"),
        "width_attributes": report.pop("width_attributes"),
        "unwrapped_parameters": report["unwrapped_parameters"],
        "report": report,
        "source": source,
    }
    meta = {**_file_meta(sidecar), "pruning": record, "kind": KIND, "config": plain_config(cfg), "key": key}
    save_model(path, pruned, {**meta, "command": command})
    return record


def _recovery_objective(r: dict, student: nn.Module, shape: tuple, t0: float, store) -> tuple[Callable, Callable]:
    """(make_batch, make_loss) of recovery mode `r["mode"]`: one_step distils the unpruned student's one-step
    images on fresh noise; flow retrains on the pairs; distill is the distill stage's loss (`distill_loss`) on the
    pairs with the unpruned student as the frozen guide of its two-step term."""
    batch_size, seed = r["train"]["batch_size"], r["train"]["seed"]
    if r["mode"] == "one_step":

        def make_loss(device):
            d = distance(r["distance"], **r["options"])
            d = d.to(device) if isinstance(d, nn.Module) else d
            return one_step_recovery_loss(student.to(device), d, t0)

        def make_batch(step, gen):  # a class-conditional student's fresh noise gets fresh labels (drawn last)
            batch = {"z": torch.randn((batch_size, *shape), generator=gen)}
            classes = num_classes(student)
            return {**batch, "labels": torch.randint(classes, (batch_size,), generator=gen)} if classes else batch
    elif r["mode"] == "distill":
        loss_cfg = _distill_loss_config(r, t0)
        make_batch = distill_stage.make_distill_batch(store, r["train"], loss_cfg)

        def make_loss(device):
            d = distance(r["distance"], **r["options"])
            d = d.to(device) if isinstance(d, nn.Module) else d
            return distill_stage.distill_loss(student.to(device), d, loss_cfg)
    else:

        def make_loss(device):
            return flow_loss

        def make_batch(step, gen):
            t = 1e-3 + (1 - 1e-3) * torch.rand(batch_size, generator=gen)
            return pairs_flow_batch(store, batch_indices(step, batch_size, len(store), seed), t)

    return make_batch, make_loss


def _distill_loss_config(r: dict, t0: float) -> dict:
    """The distill stage's loss settings (its defaults: both terms, weights 1, t' in [0.2, 0.8]) with recovery's
    distance, at the student's one-step time t0."""
    return {**distill_stage.DEFAULTS["loss"], "distance": r["distance"], "options": r["options"], "one_step_time": t0}


def _recover_stage(cfg: dict, student: nn.Module, start: Path, folder: Path, store, command: str) -> dict:
    """Train the model file `start` (pruned or masked) in folder/recover and export folder/recovered_ema.safetensors
    by the stage recipe (skipped when that export was made from this file with these settings); its masks, if any,
    are held through training."""
    r = cfg["recover"]
    sidecar = read_model_file(start)[0]
    # the start file carries the effect of the channel and sparsity settings; its hash is in the key
    recover_cfg = {
        **{k: v for k, v in cfg.items() if k != "sparsity"},
        "prune": keyed_prune_settings(cfg["prune"]),
        "pruned_sha256": sha256_file(start),
    }
    meta = _file_meta(sidecar)
    shape = tuple(example_inputs(sidecar["model"])[0].shape[1:])
    make_batch, make_loss = _recovery_objective(r, student, shape, meta["one_step_time"], store)

    def eval_data() -> tuple[torch.Tensor, ...]:  # fixed noise (compare.seed), not a training draw
        z = noise_for(torch.arange(r["train"]["eval_n"]), cfg["compare"]["seed"], shape)
        labels = resolve_labels(student, len(z))  # class-balanced, for a class-conditional student
        device = next(student.parameters()).device
        with torch.no_grad():
            target = one_step_images(student, z.to(device), meta["one_step_time"], labels).cpu()
        return (z, target) if labels is None else (z, target, labels)

    records = {"pruning": sidecar.get("pruning"), "weight_masks": sidecar.get("weight_masks")}
    started = time.time()
    job = TrainingJob(
        # train settings at the top level, where the run directory allows steps/logging to change on resume
        out=folder / "recover",
        export_dir=folder,
        kind="recovered-" + (SPARSE_KIND if records["weight_masks"] else KIND),
        export_name="recovered_ema.safetensors",
        run_config={
            **recover_cfg,
            "recover": {k: v for k, v in r.items() if k != "train"},
            "train": r["train"],
            "model": sidecar["model"],
            **records,
        },
        train=r["train"],
        build=lambda: load_model(start).train().requires_grad_(True),
        make_batch=make_batch,
        make_loss=make_loss,
        sample_fn=one_step_sampler(cfg["compare"]["n"], shape, cfg["compare"]["seed"]),
        eval_fn=with_dead_neuron_rate(
            one_step_eval("one_step_l2_to_unpruned", eval_data, meta["one_step_time"]),
            cfg["sparsity"]["dnr_threshold"],
        ),
        meta={
            "one_step_time": meta["one_step_time"],
            "pairs": meta["pairs"],
            **records,
            "recovered_from": str(start),
        },
        settings=recover_cfg,
    )
    result = run_training(job, command)
    return {
        "status": result["status"],
        "seconds": time.time() - started,
        "file": str(job.export),
        **{k: result.get(k) for k in ("steps", "img_per_s", "final", "eval")},
    }


def with_dead_neuron_rate(eval_fn: Callable, threshold: float) -> Callable:
    """`eval_fn` that also reports the dead-neuron rate of the SiLUs over its forward passes ("dnr", and
    "dnr/<module>" per activation)."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        with DeadNeuronMonitor(model, threshold=threshold) as monitor:
            values = eval_fn(model)
        rates = monitor.rates()
        return {**values, "dnr": rates["overall"], **{f"dnr/{k}": v for k, v in rates["layers"].items()}}

    return evaluate


def _sparsity_stage(cfg: dict, student: nn.Module, source: Path, phase: tuple | None, store, command: str) -> dict:
    """The weight-pruning cycles: cycle k masks the model of cycle k − 1 (first: `source`) to its target and
    recovers it in out/sparsity/cycle_<k>/. AP compares the weights at the start and end of the last training
    phase (`phase`: the start and end files; None: none known, so cycle 1 removes by magnitude alone)."""
    cycles = []
    for k, target in enumerate(sparsity_plan(cfg["sparsity"]), 1):
        folder = Path(cfg["out"]) / "sparsity" / f"cycle_{k}"
        started = time.time()
        masked, record, status = _mask_stage(cfg, source, target, phase, folder / "masked.safetensors", command)
        cycle = {"name": _cycle_name(target), "status": status, "seconds": time.time() - started, **record}
        if cfg["recover"]["mode"] != "none":
            cycle["recover"] = _recover_stage(cfg, student, masked, folder, store, command)
            phase, source = (masked, folder / "recovered_ema.safetensors"), folder / "recovered_ema.safetensors"
        else:
            phase, source = None, masked
        cycles.append({**cycle, "masked_file": str(masked), "file": str(source)})
    return {"cycles": cycles, "final": str(source)}


def _cycle_name(target) -> str:
    return f"sparse-{target}" if isinstance(target, str) else f"sparse-{round(100 * target)}%"


def _mask_stage(
    cfg: dict, source: Path, target, phase: tuple | None, path: Path, command: str
) -> tuple[Path, dict, str]:
    """Write `path`: the model at `source` with the weights of one cycle removed (its masks attached), unless
    made from the same inputs; returns the file, its weight_masks record and the status."""
    s = cfg["sparsity"]
    key = content_hash(
        [model_identity(source), s["pattern"], s["ap_fraction"], s["scope"], target]
        + [model_identity(p) for p in phase or ()]
    )
    if is_current(path, key):
        return path, read_model_file(path)[0]["weight_masks"], "skipped"
    sidecar = read_model_file(source)[0]
    model = load_model(source)
    before = masks_of(model) or WeightMasks.dense(model)
    if isinstance(target, str):  # an n:m pattern
        n, m = (int(x) for x in target.split(":"))
        masks, dense_layers = n_of_m_masks(model, n, m)
        ap_fraction, notes = 0.0, [f"left dense (input size not a multiple of {m}): {', '.join(dense_layers)}"]
    else:
        ap_fraction, notes = s["ap_fraction"], []
        start_weights = _start_weights(phase, model) if ap_fraction else None
        if ap_fraction and start_weights is None:
            ap_fraction = 0.0
            notes.append("no earlier training phase is known (set sparsity.ap_reference): removed by magnitude alone")
        masks = prune_cycle(
            model,
            before,
            rate=cycle_rate(before.sparsity(), target),
            ap_fraction=ap_fraction,
            start_weights=start_weights,
            scope=s["scope"],
        )
    attach_masks(model, masks)
    history = (sidecar.get("weight_masks") or {}).get("history", [])
    record = {
        "layers": list(masks.masks),
        "sparsity": masks.sparsity(),
        "history": [*history, {"target": target, "ap_fraction": ap_fraction, "scope": s["scope"], "notes": notes}],
    }
    meta = {**_file_meta(sidecar), "pruning": sidecar.get("pruning"), "weight_masks": record, "kind": SPARSE_KIND}
    save_model(path, model, {**meta, "config": plain_config(cfg), "key": key, "command": command})
    return path, record, "ran"


def _start_weights(phase: tuple | None, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The weights of `phase`'s start file, checked against `model` (AP's reference point); None without one."""
    if phase is None:
        return None
    start = load_model(phase[0]).state_dict()
    own = model.state_dict()
    differ = [k for k in own if k in start and start[k].shape != own[k].shape] + [k for k in own if k not in start]
    differ = [k for k in differ if not k.endswith(".weight_mask")]
    if differ:
        raise ValueError(
            f"the AP reference {str(phase[0])!r} does not have the pruned model's architecture (e.g. {differ[0]}); "
            "give the student's weights from when its last training began"
        )
    return start


def _compare_stage(cfg: dict, student: nn.Module, sidecar: dict, files: dict[str, Path]) -> dict:
    """For each model (unpruned, pruned, recovered, sparse cycles): params and non-zero params, MACs, latency
    (batch 1), file sizes, the mean l2 of its one-step images to the unpruned student's on the same noise and the
    dead-neuron rate of its SiLUs; grids of the images in out/grids."""
    out = Path(cfg["out"])
    device = resolve_device(cfg["recover"]["train"]["device"])
    inputs = tuple(x.to(device) for x in example_inputs(sidecar["model"]))
    z = noise_for(torch.arange(cfg["compare"]["n"]), cfg["compare"]["seed"], list(inputs[0].shape[1:])).to(device)
    labels = resolve_labels(student, len(z))  # class-balanced, for a class-conditional student
    t0 = _file_meta(sidecar)["one_step_time"]
    rows, reference = {}, None
    for name, path in files.items():
        model = student if name == "unpruned" else load_model(path)
        model = model.to(device).eval()
        with torch.no_grad(), DeadNeuronMonitor(model, threshold=cfg["sparsity"]["dnr_threshold"]) as monitor:
            images = one_step_images(model, z, t0, labels).cpu()
        reference = images if reference is None else reference
        macs, params = count_macs_params(model, inputs)
        masks = masks_of(model)
        rates = monitor.rates()
        rows[name] = {
            "file": str(path),
            "params": params,
            "nonzero_params": params - (masks.total() - masks.alive() if masks else 0),
            "weight_sparsity": masks.sparsity() if masks else 0.0,
            "macs": macs,
            "latency_ms_b1": measure_latency(model, inputs, warmup=3, repeats=10),
            "l2_to_unpruned": l2(images, reference).mean().item(),
            **_file_sizes(model, masks, Path(path)),
            "dnr": rates["overall"],
            "dnr_layers": rates["layers"],
        }
        save_grid(images, out / "grids" / f"{name}.png")
    return rows


def _file_sizes(model: nn.Module, masks: WeightMasks | None, path: Path) -> dict[str, int]:
    """Bytes of the model file, of it deflated (zlib level 9) and, for a sparse model, of its parameters as
    per-layer bitmasks + non-zero values (`pruning.sparse_storage_bytes`)."""
    if not path.is_file():  # a training run directory
        return {}
    data = path.read_bytes()
    sizes = {"file_bytes": len(data), "deflated_bytes": len(zlib.compress(data, 9))}
    if masks is not None:
        sizes["sparse_bytes"] = sparse_storage_bytes(model, masks)
    return sizes
