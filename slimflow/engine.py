"""The one training loop every trainer uses.

A trainer supplies two functions:
- `make_batch(step, generator) -> dict` builds the *global* batch for `step` (data, noise, times...) drawing all
  randomness from `generator`, which the engine seeds from (seed, step). The engine gives each rank its slice,
  so a run on W processes sees exactly the examples a single process would, and a resumed run sees exactly the
  examples it would have seen without the interruption.
- `loss_fn(model, batch) -> loss` or `(loss, {name: scalar})` on the rank's slice (mean over the slice); every
  `log_every` steps the mean of each scalar over those steps is logged.

The engine owns: device, Adam/AdamW with linear warm-up, grad clipping, EMA (fixed decay or SlimFlow's power
law), bf16 autocast, opt-in `torch.compile`, DDP under `torchrun`, TensorBoard scalars and sample grids, tqdm,
periodic atomic checkpoints with RNG and optimizer state, exact resume, and a clear stop on non-finite losses.

A trainer may also supply `eval_fn(model) -> {name: scalar}`: every `eval_every` steps (and at the last step) the
engine calls it on the EMA (else raw) model in eval mode without gradients, restores the RNG states afterwards, and
logs the scalars as eval/<name> to TensorBoard, the console and the result's `evals`. It draws no training
randomness, so the weights are the same with evaluation on or off.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from pruning.unstructured import masks_of
from slimflow import checkpoint as ckpt
from slimflow.images import grid_image, save_grid

TRAIN_DEFAULTS: dict = {
    "steps": 1000,
    "batch_size": 128,
    "optimizer": "adam",  # adam | adamw
    "lr": 2e-4,
    "betas": [0.9, 0.999],
    "weight_decay": 0.0,
    "warmup": 500,
    "lr_schedule": "constant",  # after the warm-up: constant | cosine | linear (decay to min_lr at train.steps)
    "min_lr": 0.0,
    "grad_clip": 1.0,
    "ema": {"kind": "fixed", "decay": 0.999, "max_decay": 0.999999},  # kind: fixed | power | none
    "precision": "auto",  # auto (bf16 on CUDA when supported, else fp32) | fp32 | bf16
    "compile": False,
    "device": "auto",
    "seed": 0,
    "log_every": 50,
    "sample_every": 0,  # 0 = only at the end
    "eval_every": 0,  # 0 = never; else the trainer's eval_fn every that many steps and at the end
    "eval_n": 256,  # size of the fixed evaluation set (see the stage: last pairs of the store, or fixed noise)
    "ckpt_every": 500,
    "keep_ckpts": 2,
}
# What each training setting means (`--help-config`; stages reuse it under their train section).
TRAIN_HELP: dict[str, str] = {
    "steps": "optimizer steps of the run (may grow when a run resumes)",
    "batch_size": "global batch size (split over the processes under torchrun)",
    "optimizer": "adam | adamw",
    "lr": "learning rate after the warm-up",
    "betas": "Adam's (beta1, beta2)",
    "weight_decay": "weight decay (decoupled with adamw)",
    "warmup": "steps of linear learning-rate warm-up",
    "lr_schedule": "after the warm-up: constant | cosine | linear decay to min_lr at the last step",
    "min_lr": "the learning rate that cosine/linear decay reaches at the last step",
    "grad_clip": "clip the global gradient norm to this (0 or null: no clipping)",
    "ema.kind": "EMA of the weights: fixed decay | power (SlimFlow's min(max_decay, (1+n)/(10+n))) | none",
    "ema.decay": "decay of the fixed EMA",
    "ema.max_decay": "upper bound of the power-law EMA decay",
    "precision": "auto (bf16 on CUDA when supported, else fp32) | fp32 | bf16",
    "compile": "torch.compile the model",
    "device": "auto (this rank's GPU, else CPU) | cpu | cuda | cuda:N",
    "seed": "seed of the initial weights, dropout and every step's batch",
    "log_every": "steps between logged losses (means over the window)",
    "sample_every": "steps between sample grids (0: only at the end)",
    "eval_every": "steps between evaluations logged as eval/... (0: none; docs/methods.md, Periodic evaluation)",
    "eval_n": "examples of the fixed evaluation set (last pairs of the store; prune recovery: fixed noises)",
    "ckpt_every": "steps between checkpoints (0: only at the end)",
    "keep_ckpts": "checkpoints kept on disk",
}


def _rate(steps: int, batch_size: int, started: float) -> float:
    return steps * batch_size / max(time.time() - started, 1e-9)


@contextlib.contextmanager
def _stop_requests():
    """Turn SIGINT/SIGTERM into a request honoured between steps (so a checkpoint is never half a step)."""
    requests: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda num, frame: requests.append(signal.Signals(num).name))
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; nothing after the last good checkpoint was written."""


# --------------------------------------------------------------------------------------- small pure pieces
LR_SCHEDULES = ("constant", "cosine", "linear")


def learning_rate(step: int, cfg: dict) -> float:
    """The learning rate of `step` (0-based): linear warm-up over train.warmup steps, then train.lr held
    (constant) or decayed to train.min_lr at train.steps along a half cosine or a straight line."""
    lr = warmup_lr(step, cfg["lr"], cfg["warmup"])
    schedule, warmup, total = cfg["lr_schedule"], cfg["warmup"], cfg["steps"]
    if schedule == "constant" or step < warmup or total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return cfg["min_lr"] + (cfg["lr"] - cfg["min_lr"]) * shape


def warmup_lr(step: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up from base_lr/warmup to base_lr over `warmup` steps, then constant (reference schedule)."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


def ema_decay(kind: str, step: int, decay: float, max_decay: float) -> float:
    """Fixed decay, or SlimFlow's power law min(max_decay, (1 + n) / (10 + n))."""
    if kind == "fixed":
        return decay
    if kind == "power":
        return min(max_decay, (1 + step) / (10 + step))
    raise ValueError(f"unknown EMA kind {kind!r}: use 'fixed', 'power' or 'none'")


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def window_means(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each scalar's mean over the steps of a logging window; the learning rate is the last step's."""
    means = {key: sum(row[key] for row in rows) / len(rows) for key in rows[-1]}
    if "train/lr" in means:
        means["train/lr"] = rows[-1]["train/lr"]
    return means


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator that draws all of step `step`'s randomness (independent of rank and resume)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at `step`: consecutive slices of per-epoch permutations of range(n)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = perm[offset : offset + batch_size - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return torch.tensor(out, dtype=torch.long)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (this rank's GPU when CUDA is available, else the CPU) or a torch device name that exists here."""
    if name == "auto":
        if torch.cuda.is_available():
            rank = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", rank)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available here: use device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# (key, smallest allowed value) of the integer training settings
_TRAIN_INTS = (
    ("steps", 1),
    ("batch_size", 1),
    ("warmup", 0),
    ("log_every", 1),
    ("sample_every", 0),
    ("eval_every", 0),
    ("eval_n", 1),
    ("ckpt_every", 0),
    ("keep_ckpts", 1),
    ("seed", 0),
)


def check_train_config(cfg: dict) -> None:
    """Raise ValueError naming the first training setting (see TRAIN_DEFAULTS) of a wrong type or range, before
    any work: a run with train.steps=0 must not export an untrained model."""

    def bad(key: str, rule: str) -> ValueError:
        return ValueError(f"train.{key} must be {rule}, got {cfg.get(key)!r}")

    for key, low in _TRAIN_INTS:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(key, f"an integer >= {low}")
    for key, low in (("lr", 0.0), ("weight_decay", 0.0), ("grad_clip", 0.0)):
        value = cfg[key]
        if key == "grad_clip" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            raise bad(key, "a finite number >= 0")
    if cfg["lr"] <= 0:
        raise bad("lr", "a finite number > 0")
    if cfg["lr_schedule"] not in LR_SCHEDULES:
        raise bad("lr_schedule", " | ".join(LR_SCHEDULES))
    min_lr = cfg["min_lr"]
    if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or not 0.0 <= min_lr <= cfg["lr"]:
        raise bad("min_lr", "a number in [0, train.lr]")
    if cfg["optimizer"] not in ("adam", "adamw"):
        raise bad("optimizer", "adam or adamw")
    if cfg["precision"] not in ("auto", "fp32", "bf16"):
        raise bad("precision", "auto, fp32 or bf16")
    ema = cfg["ema"]
    if ema["kind"] not in ("fixed", "power", "none"):
        raise ValueError(f"train.ema.kind must be fixed, power or none, got {ema['kind']!r}")
    for key in ("decay", "max_decay"):
        value = ema.get(key, TRAIN_DEFAULTS["ema"][key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"train.ema.{key} must lie in [0, 1], got {value!r}")
    resolve_device(cfg["device"])


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    raise ValueError(f"unknown precision {precision!r}: use auto, fp32 or bf16")


# --------------------------------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_batch(batch: dict, rank: int, world: int, device: torch.device) -> dict:
    """This rank's contiguous slice of every batched tensor, moved to `device`."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0:
            if value.shape[0] % world:
                raise ValueError(f"global batch of {value.shape[0]} does not split over {world} processes")
            per = value.shape[0] // world
            value = value[rank * per : (rank + 1) * per]
        out[key] = value.to(device, non_blocking=True) if torch.is_tensor(value) else value
    return out


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(packed)
    packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist()))


# --------------------------------------------------------------------------------------- the trainer
class Trainer:
    """Holds the state that is real across steps: model, EMA, optimizer, writer, step."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_cfg: dict,
        run_dir: str | Path,
        run_config: dict,
        sample_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None,
        eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    ):
        self.cfg = {**TRAIN_DEFAULTS, **train_cfg}
        check_train_config(self.cfg)
        self.run_dir = Path(run_dir)
        self.run_config = run_config
        self.sample_fn = sample_fn
        self.eval_fn = eval_fn
        self.rank, self.world = dist_info()
        self.device = resolve_device(self.cfg["device"])
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp_dtype = autocast_dtype(self.cfg["precision"], self.device)
        if self.cfg["batch_size"] % self.world:
            raise ValueError(
                f"train.batch_size={self.cfg['batch_size']} must be divisible by the {self.world} processes"
            )
        torch.manual_seed(self.cfg["seed"] + self.rank)  # dropout etc.; restored exactly on resume
        self.model = model.to(self.device)
        # a sparse model (masks attached by pruning.attach_masks): its pruned weights stay exactly zero
        self.masks = masks_of(self.model)
        if self.masks is not None:
            self.masks.apply(self.model)
        self.ema = None
        if self.cfg["ema"]["kind"] != "none":
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = self._make_optimizer()
        if self.masks is not None:  # gradients masked, masked weights re-zeroed after every optimizer step
            self.masks.enforce(self.model, self.optimizer)
        self.step = 0
        self.saved_step: int | None = None  # the step of the newest checkpoint on disk
        self.writer = None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        kind = self.cfg["optimizer"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        kwargs = dict(lr=self.cfg["lr"], betas=tuple(self.cfg["betas"]), weight_decay=self.cfg["weight_decay"])
        if kind == "adam":
            return torch.optim.Adam(params, **kwargs)
        if kind == "adamw":
            return torch.optim.AdamW(params, **kwargs)
        raise ValueError(f"unknown optimizer {kind!r}: use adam or adamw")

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def resume(self) -> bool:
        """Load the latest checkpoint of this run, if any; True when it resumed."""
        found = ckpt.latest_checkpoint(self.ckpt_root)
        if self.rank == 0:
            ckpt.remove_partial_checkpoints(self.ckpt_root)
        if found is None:
            return False
        meta, tensors = ckpt.load_training_checkpoint(found)
        ckpt.check_config(self.run_config.get("model", {}), meta["config"].get("model", {}), str(found))
        ckpt.load_state_checked(self.model, {k: v.to(self.device) for k, v in tensors["model"].items()}, str(found))
        if self.ema is not None and "ema" in tensors:
            ckpt.load_state_checked(self.ema, tensors["ema"], str(found) + " (EMA)")
        if "optim" in tensors:
            self.optimizer.load_state_dict(ckpt.unflatten_optimizer_state(tensors["optim"], meta["optimizer"]))
        prefix = f"rank{self.rank}."
        mine = {k[len(prefix) :]: v for k, v in tensors["state"].items() if k.startswith(prefix)}
        if not mine:
            raise ckpt.CheckpointError(
                f"{found} holds no RNG state for rank {self.rank}: it was written by "
                f"{meta['extra'].get('world_size')} processes, this run has {self.world}"
            )
        ckpt.set_rng_state(mine)
        self.step = self.saved_step = meta["step"]
        return True

    def save(self) -> Path | None:
        """Every rank must call this: RNG states are gathered from all ranks, rank 0 writes."""
        states = [ckpt.rng_state()]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, ckpt.rng_state())
        rng = {f"rank{r}.{k}": v for r, state in enumerate(states) for k, v in state.items()}
        path = None
        if self.rank == 0:
            path = ckpt.save_training_checkpoint(
                self.ckpt_root,
                self.step,
                self.model,
                self.optimizer,
                self.ema,
                self.run_config,
                rng,
                extra={"world_size": self.world},
                keep=self.cfg["keep_ckpts"],
            )
        if self.world > 1:
            dist.barrier()
        self.saved_step = self.step
        return path

    def _tensorboard(self) -> SummaryWriter:
        if self.writer is None:
            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        return self.writer

    def _log(self, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self._tensorboard().add_scalar(name, value, self.step)

    def _sample(self) -> Path | None:
        """Grid of `sample_fn(EMA model)` to samples/step_<n>.png and TensorBoard."""
        if self.sample_fn is None:
            return None
        model = self.ema if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            images = self.sample_fn(model)
        model.train(was_training)
        self._tensorboard().add_image("samples", grid_image(images), self.step)
        return save_grid(images, self.run_dir / "samples" / f"step_{self.step:08d}.png")

    def _evaluate(self) -> dict[str, float] | None:
        """`eval_fn(EMA model)` in eval mode without gradients, logged as eval/<name>; every RNG state is put back,
        so training draws the same numbers with evaluation on or off."""
        if self.eval_fn is None:
            return None
        model = self.ema if self.ema is not None else self.model
        was_training, rng = model.training, ckpt.rng_state()
        model.eval()
        try:
            with torch.no_grad():
                values = self.eval_fn(model)
        finally:
            ckpt.set_rng_state(rng)
            model.train(was_training)
        scalars = {f"eval/{name}": float(value) for name, value in values.items()}
        self._log(scalars)
        shown = {k: v for k, v in scalars.items() if k.count("/") == 1}  # per-layer values go to TensorBoard only
        tqdm.write(f"{self.run_dir.name} step {self.step}: " + ", ".join(f"{k} {v:.6g}" for k, v in shown.items()))
        return {"step": self.step, **scalars}

    def fit(self, make_batch: Callable, loss_fn: Callable, steps: int | None = None) -> dict:
        """Train until `steps` (default train.steps); resumes from the run's latest checkpoint."""
        steps = self.cfg["steps"] if steps is None else steps
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.resume()
        net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg["compile"]:
            net = torch.compile(net)
        self.model.train()
        history: list[dict] = []
        evals: list[dict] = []
        bar = tqdm(total=steps, initial=self.step, disable=self.rank != 0, desc=self.run_dir.name, dynamic_ncols=True)
        started, first_step = time.time(), self.step
        with _stop_requests() as stop:
            window: list[dict[str, float]] = []  # the steps since the last log
            while self.step < steps and not stop:
                window.append(self._train_step(net, make_batch, loss_fn))
                self.step += 1
                bar.update(1)
                if self.step % self.cfg["log_every"] == 0 or self.step == steps:
                    scalars = mean_over_ranks(window_means(window), self.device)
                    window = []
                    scalars["train/img_per_s"] = _rate(self.step - first_step, self.cfg["batch_size"], started)
                    history.append({"step": self.step, **scalars})
                    bar.set_postfix(loss=f"{scalars['train/loss']:.4f}")
                    if self.rank == 0:
                        self._log(scalars)
                if self.cfg["sample_every"] and self.step % self.cfg["sample_every"] == 0 and self.rank == 0:
                    self._sample()
                every = self.cfg["eval_every"]
                if every and (self.step % every == 0 or self.step == steps) and self.rank == 0 and self.eval_fn:
                    evals.append(self._evaluate())
                if self.cfg["ckpt_every"] and self.step % self.cfg["ckpt_every"] == 0:
                    self.save()
        bar.close()
        if self.step != self.saved_step:  # the last periodic checkpoint may already hold this step
            self.save()
        if stop:
            raise KeyboardInterrupt(
                f"stopped by {stop[0]} after step {self.step}; the checkpoint is saved, "
                f"run the same command again to resume"
            )
        if self.rank == 0:
            self._sample()
            if self.writer is not None:
                self.writer.flush()
        return {
            "resumed": resumed,
            "steps": self.step,
            "history": history,
            "evals": evals,
            "seconds": time.time() - started,
            "img_per_s": _rate(self.step - first_step, self.cfg["batch_size"], started),
        }

    def _train_step(self, net, make_batch, loss_fn) -> dict[str, float]:
        batch = make_batch(self.step, step_generator(self.cfg["seed"], self.step))
        batch = shard_batch(batch, self.rank, self.world, self.device)
        lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            out = loss_fn(net, batch)
        loss, extra = out if isinstance(out, tuple) else (out, {})
        finite = torch.isfinite(loss.detach()).float()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            last = ckpt.latest_checkpoint(self.ckpt_root)
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step}; no checkpoint was written after it. "
                f"Last good checkpoint: {last or 'none'}. The same command would meet the same batch again: check "
                f"the data, or lower train.lr in a new run (another out=, or delete {self.run_dir} to start over; "
                "a run refuses to resume under other settings)."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg["grad_clip"] if self.cfg["grad_clip"] else math.inf
        )
        self.optimizer.step()
        if self.ema is not None:
            e = self.cfg["ema"]
            ema_update(self.ema, self.model, ema_decay(e["kind"], self.step, e["decay"], e["max_decay"]))
        scalars = {"train/loss": loss.item(), "train/grad_norm": float(grad_norm), "train/lr": lr}
        scalars.update({f"train/{k}": float(v) for k, v in extra.items()})
        return scalars
