"""The recipe every training stage follows, written once.

A training stage (teacher, anneal, distill, prune recovery) describes its job as a `TrainingJob`; `run_training`
then does the rest the same way for all of them:

1. **current?** The job's `run_config` (its merged settings plus the identity of its inputs: pairs hash, student
   file hash, ...) has a `content_hash`, its *key*. When the exported model exists and its sidecar records that
   key, the stage is finished: nothing runs (status "skipped").
2. **run directory**: `out/config.yaml` records the settings; a run already there must have been started with
   the same settings, except those in `RESUMABLE_CHANGES` (else an error lists the differences; never a mixed
   run).
3. **build and train** with the engine, resuming from `out/checkpoints` (status "resumed" or "ran"); with
   train.eval_every > 0 the job's `eval_fn` (e.g. `one_step_eval`) is logged every that many steps.
4. **export** the EMA (else raw) weights to `out/<export_name>` with a sidecar (model config, kind, time
   convention, the job's metadata, steps, settings, key, command), and write `out/summary.json`.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimflow import config as cfglib
from slimflow.checkpoint import atomic_write_text, content_hash, save_model, shipped_path
from slimflow.engine import Trainer, barrier
from slimflow.losses import l2
from slimflow.sample import one_step_images

TIME_CONVENTION = "t=0 noise, t=1 data"
# Settings a run may change between sessions without changing what it computes.
RESUMABLE_CHANGES = (
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.keep_ckpts",
    "train.device",
    "train.eval_every",
    "train.eval_n",
    "sample.",
)


# Settings added after runs existed, with the value that means the old behaviour: a run directory written before
# them (the key absent) resumes when the requested value is that one.
ADDED_SETTINGS = {"lr_schedule": "constant", "min_lr": 0.0, "init_architecture": False}


# ------------------------------------------------------------------------------------------ settings
def full_config(defaults: dict, cfg: dict) -> dict:
    """`cfg` merged onto `defaults` (unknown keys are errors), without the open-mapping markers."""
    return cfglib.strip_markers(cfglib.merge(defaults, cfg))


def plain_config(cfg: dict) -> dict:
    """The config as it reads back from YAML/JSON (tuples become lists)."""
    return json.loads(json.dumps(cfg))


def command_line(command: str | None) -> str:
    """What a sidecar records as the command that made it (default: this process's command line)."""
    return command or " ".join(map(shlex.quote, sys.argv))


def start_run_dir(out: Path, run_config: dict) -> None:
    """Create `out` and write config.yaml. A run already there must have been started with the same settings,
    except those in RESUMABLE_CHANGES; otherwise it is an error naming the differences (never a mixed run)."""
    path = out / "config.yaml"
    if path.is_file():
        old, new = cfglib.flatten(cfglib.yaml_load(path.read_text()) or {}), cfglib.flatten(plain_config(run_config))
        diffs = [
            f"{key}: run has {old.get(key)!r}, requested {new.get(key)!r}"
            for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)
            and not key.startswith(RESUMABLE_CHANGES)
            and not (key not in old and ADDED_SETTINGS.get(key.rpartition(".")[2], object()) == new.get(key))
        ]
        if diffs:
            raise ValueError(
                f"{out} holds a run started with other settings; resuming it would mix them. Use another "
                f"out, or delete {out} to start over. Differences:\n  " + "\n  ".join(diffs)
            )
    out.mkdir(parents=True, exist_ok=True)
    cfglib.dump(plain_config(run_config), path)


def require_input(path: str | Path, what: str, hint: str) -> Path:
    """`path`, or a FileNotFoundError naming what it is and how to make it."""
    found = shipped_path(path)
    if not found.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist; {hint}")
    return found


TEACHER_HINT = "train one with `slimflow teacher train` or set teacher= to a model file"


# ------------------------------------------------------------------------------------------ evaluation
def one_step_eval(
    name: str, data: Callable[[], tuple[torch.Tensor, torch.Tensor]], t0: float | None = None, batch_size: int = 256
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """eval_fn for the engine: {name: mean l2 between the model's one-step images z + v(z, t0) and fixed target
    images}. `data()` gives the fixed (z, target) pairs, or (z, target, labels) for a class-conditional model; it
    is called once, at the first evaluation (t0: the model's own one-step time unless given)."""
    fixed: list[torch.Tensor] = []

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        if not fixed:
            fixed.extend(data())
        z, target, *rest = fixed
        labels = rest[0] if rest else None
        device = next(model.parameters()).device
        total = 0.0
        for start in range(0, len(z), batch_size):
            zb, xb = z[start : start + batch_size].to(device), target[start : start + batch_size].to(device)
            yb = None if labels is None else labels[start : start + batch_size].to(device)
            total += l2(one_step_images(model, zb, t0, yb).float(), xb.float()).sum().item()
        return {name: total / len(z)}

    return eval_fn


def last_pairs(store, n: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """data() for `one_step_eval`: the last n pairs (z, teacher image) of a pair store (all of them when it holds
    fewer), with their labels when the store is class-conditional. Training draws from every pair of the store, so
    these are not held out."""

    def data() -> tuple[torch.Tensor, ...]:
        index = torch.arange(max(0, len(store) - n), len(store))
        labels = store.labels(index)
        return (*store.get(index), *([] if labels is None else [labels]))

    return data


def check_student_classes(student_classes: int, store, what: str) -> None:
    """A student is conditioned on exactly the classes of its pairs: a clear error otherwise."""
    if student_classes != store.num_classes:

        def describe(k: int) -> str:
            return f"class-conditional ({k} classes)" if k else "unconditional"

        raise ValueError(
            f"{what} is {describe(student_classes)} but the pair store {store.root} is {describe(store.num_classes)} "
            "(made by such a teacher); a student learns its pairs' labels: use a matching student or store"
        )


# ------------------------------------------------------------------------------------------ "current"
def is_current(output: str | Path, key: str) -> bool:
    """True when the output exists and records `key`, the `content_hash` of everything it depends on (it was made
    from exactly these inputs): a model file in its sidecar, a JSON record in itself."""
    output = Path(output)
    record = output if output.suffix == ".json" else output.with_suffix(".json")
    if not output.is_file() or not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("key") == key
    except json.JSONDecodeError:
        return False


def write_summary(out: Path, summary: dict) -> None:
    atomic_write_text(Path(out) / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")


def read_summary(out: Path) -> dict:
    path = Path(out) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------------------------------ the recipe
@dataclass
class TrainingJob:
    """What one training stage trains, on what, and what its exported model file records."""

    out: str | Path
    kind: str  # the sidecar's kind, e.g. "annealed-student"
    export_name: str  # e.g. "annealed_ema.safetensors"
    run_config: dict  # settings + identity of the inputs; recorded in config.yaml, hashed into the key
    train: dict  # the engine's settings (see slimflow.engine.TRAIN_DEFAULTS)
    build: Callable[[], torch.nn.Module]  # the initial model (called after seeding with train.seed)
    make_batch: Callable[[int, torch.Generator], dict]
    make_loss: Callable[[torch.device], Callable]  # loss_fn(model, batch) on the trainer's device
    sample_fn: Callable | None = None
    eval_fn: Callable | None = None  # eval_fn(model) -> {name: scalar}, logged every train.eval_every steps
    meta: dict = field(default_factory=dict)  # extra sidecar entries (pairs, guide, pruning, one_step_time, ...)
    summary: dict = field(default_factory=dict)  # extra summary entries
    settings: dict | None = None  # what the sidecar records as "config" (default: run_config)
    export_dir: str | Path | None = None  # where the model file goes (default: out)

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    @property
    def export(self) -> Path:
        return Path(self.export_dir or self.out) / self.export_name


def run_training(job: TrainingJob, command: str | None = None) -> dict:
    """Skip, resume or run `job` (see the module docstring); returns the stage summary, also written to
    `job.out/summary.json` (rank 0)."""
    key = content_hash(job.run_config)
    if is_current(job.export, key):
        return {**read_summary(job.out), "status": "skipped", "export": str(job.export)}
    start_run_dir(job.out, job.run_config)
    torch.manual_seed(job.train["seed"])  # initial weights are a function of the seed
    model = job.build()
    started = time.time()
    trainer = Trainer(model, job.train, job.out, job.run_config, sample_fn=job.sample_fn, eval_fn=job.eval_fn)
    result = trainer.fit(job.make_batch, job.make_loss(trainer.device))
    final = result["history"][-1] if result["history"] else None
    summary = {
        "kind": job.kind,
        "status": "resumed" if result["resumed"] else "ran",
        "params": sum(p.numel() for p in model.parameters()),
        "steps": result["steps"],
        "resumed": result["resumed"],
        "img_per_s": result["img_per_s"],
        "seconds_this_session": time.time() - started,
        "final": final,
        **({"eval": result["evals"][-1]} if result["evals"] else {}),
        **job.summary,
        "export": str(job.export),
    }
    if trainer.rank == 0:
        save_model(
            job.export,
            trainer.ema or trainer.model,
            {
                "model": job.run_config["model"],
                "kind": job.kind,
                "time_convention": TIME_CONVENTION,
                **job.meta,
                "steps": result["steps"],
                "config": plain_config(job.settings or job.run_config),
                "key": key,
                "command": command_line(command),
            },
        )
        write_summary(job.out, summary)
    barrier()
    return summary
