"""Checkpoints: safetensors for tensors, a JSON sidecar for everything else, atomic on disk.

Two layouts:
- a *training checkpoint* is a directory `ckpt-<step>/` with `model.safetensors`, optional `ema.safetensors`,
  `optim.safetensors`, `state.safetensors` (RNG states) and `meta.json` (step, config, optimizer hyper-parameters,
  sha256 of every file). It is written to a temporary directory and renamed, and `latest` names the newest one.
- an *exported model* is `<name>.safetensors` + `<name>.json` (model config and provenance).

Loading checks every file's checksum, the architecture config and each tensor's shape, and says what is wrong.

This module is also the one home of what every file the project writes or reads relies on: `content_hash` (the
identity of settings or tensors), `atomic_file`/`atomic_write_text` (write a temporary file, then rename), and
`load_torch_file` (the one `torch.load` policy: weights only unless the user opts in to unpickling code).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "slimflow-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


INSTALL_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the slimflow, teachers, pruning packages
SHIPPED = ("teachers/weights/", "slimflow/assets/")  # files installed with the packages


def shipped_path(path: str | Path) -> Path:
    """`path` as given when it exists; else, for a relative path into a folder the project ships (e.g.
    `teachers/weights/fmnist_teacher.safetensors`), the installed file, so default paths work from any directory."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.as_posix().startswith(SHIPPED):
        return path
    shipped = INSTALL_ROOT / path
    return shipped if shipped.exists() else path


def content_hash(value: Any) -> str:
    """sha256 identity of `value`: of a module or a dict of tensors, over the sorted names, shapes, dtypes and raw
    bytes of its tensors; of anything else, over its JSON with sorted keys (non-JSON values by their str)."""
    if isinstance(value, torch.nn.Module):
        value = value.state_dict()
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return _tensors_hash(value)
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _tensors_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        digest.update(json.dumps([key, list(state[key].shape), str(tensor.dtype)]).encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    return digest.hexdigest()


def require_writable(path: str | Path, kind: str = "dir") -> Path:
    """Check, before any work, that an output can be written: `path` is (or can be made) a directory when `kind`
    is "dir", or a file in one when "file"; a probe file is written and removed. Raises ValueError naming it."""
    path = Path(path)
    folder = path if kind == "dir" else path.parent
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ValueError(f"output folder {str(path)!r} is an existing file; choose another out")
    if kind == "file" and path.is_dir():
        raise ValueError(f"output file {str(path)!r} is an existing folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to {str(folder)!r} ({err.strerror or err}); choose another out") from None
    return path


def _publish(src: Path, dst: Path) -> None:
    """Rename a finished file or folder into place: the one step at which a write becomes visible."""
    write_point(dst)
    os.replace(src, dst)


def write_point(path: Path) -> None:
    """Called just before a finished write is renamed onto `path`. Does nothing; tests replace it to stop a run at
    exactly that point (a kill between two writes)."""


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends without error it is renamed onto `path` (readers
    see the old file or the new one, never half of one); on error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


# ----------------------------------------------------------------------------------------- torch files
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80


def file_kind(path: str | Path) -> str:
    """ "torch" (zip or pickle) or "safetensors", from the first bytes of the file; anything else is an error."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors first: its 8-byte header length may start with the pickle protocol byte
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"
    if head[:4] == ZIP_MAGIC or head[:1] == bytes([PICKLE_PROTO]):
        return "torch"
    raise CheckpointError(
        f"unknown checkpoint format: {str(path)!r} is neither a PyTorch file (zip or pickle) "
        f"nor safetensors (it starts with {head[:8]!r})"
    )


def load_torch_file(path: str | Path, unsafe_pickle: bool = False) -> Any:
    """`torch.load` on the CPU with weights_only=True — the project's one policy for files from others: a file
    that pickles Python objects is refused (unpickling can run its code) unless `unsafe_pickle=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    file_kind(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        text = str(err)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
        if found is None and "Weights only load failed" not in text:
            raise CheckpointError(
                f"{str(path)!r} is corrupt or truncated: torch.load failed "
                f"({type(err).__name__}: {text.strip().splitlines()[0][:200]})"
            ) from None
        if not unsafe_pickle:
            what = found.group(1) if found else "objects torch loads only by unpickling code"
            raise CheckpointError(
                f"{str(path)!r} pickles Python objects ({what}), and unpickling it could run arbitrary "
                "code, so it was not loaded. If you trust the file, pass unsafe_pickle=True (CLI: --unsafe-pickle)"
            ) from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _load_tensors(path: Path, expected_sha: str, record: str) -> dict[str, torch.Tensor]:
    """The tensors of `path`, whose sha256 must be `expected_sha` (as written in the file `record`)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    if sha256_file(path) != expected_sha:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is corrupt: its sha256 differs from the one recorded in {record}"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated ({err})") from None


# ----------------------------------------------------------------------------------------------- optimizer
def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and a JSON-able rest."""
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


# ----------------------------------------------------------------------------------- training checkpoints
def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda_{i}"] = state
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_training_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    ema: torch.nn.Module | None,
    config: dict,
    rng: dict[str, torch.Tensor],
    extra: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write `root/ckpt-<step>/`, point `root/latest` at it, keep the newest `keep` checkpoints.

    The new checkpoint is complete on disk (in a temporary folder) before it takes its name, and `latest` is
    rewritten only after that; a checkpoint it replaces is moved aside first and removed only after the new one is
    in place (`latest_checkpoint` puts it back if the process died in between)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(root)
    final = root / f"ckpt-{step:08d}"
    tmp = root / f".ckpt-{step:08d}.tmp-{os.getpid()}"
    tmp.mkdir()
    files = {"model.safetensors": model.state_dict()}
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": step, "config": config, "extra": extra or {}}
    if ema is not None:
        files["ema.safetensors"] = ema.state_dict()
    if optimizer is not None:
        tensors, meta["optimizer"] = flatten_optimizer_state(optimizer.state_dict())
        files["optim.safetensors"] = tensors
    files["state.safetensors"] = rng
    meta["sha256"] = {}
    for name, tensors in files.items():
        _save_tensors(tensors, tmp / name)
        meta["sha256"][name] = sha256_file(tmp / name)
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    aside = root / f".{final.name}.replaced-{os.getpid()}"
    if final.exists():
        _publish(final, aside)
    _publish(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(root.glob("ckpt-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(root: str | Path) -> None:
    """Remove what a process killed while writing left in `root`: temporary checkpoint folders, and old copies
    moved aside whose replacement did land."""
    root = Path(root)
    for stale in root.glob(".ckpt-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".ckpt-*.replaced-*"):
        if (root / stale.name[1:].split(".replaced-")[0]).is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint directory named by `root/latest`; None when no checkpoint was written yet.

    Recovers from an interrupted write: a checkpoint moved aside while being replaced is put back, and when
    `latest` is missing but complete checkpoints exist, the newest is used (with a warning) rather than silently
    starting over."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        complete = [p for p in sorted(root.glob("ckpt-*")) if (p / "meta.json").is_file()]
        if not complete:
            return None
        warnings.warn(
            f"{str(pointer)!r} is missing; resuming from the newest complete checkpoint {complete[-1].name}",
            stacklevel=2,
        )
        atomic_write_text(pointer, complete[-1].name + "\n")
        return complete[-1]
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        moved = sorted(root.glob(f".{path.name}.replaced-*"))
        if not moved:
            raise CheckpointError(f"{str(pointer)!r} names {path.name!r}, which does not exist")
        _publish(moved[-1], path)  # the old copy of a checkpoint whose replacement was interrupted
    return path


def read_meta(ckpt_dir: str | Path) -> dict:
    meta_path = Path(ckpt_dir) / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{str(ckpt_dir)!r} is not a slimflow checkpoint: meta.json is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(meta_path)!r} is corrupt: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(meta_path)!r} is not a {FORMAT} file (format={meta.get('format')!r})")
    return meta


def load_training_checkpoint(ckpt_dir: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read and verify every file of a training checkpoint: (meta, {file stem: tensors})."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    tensors = {
        name.removesuffix(".safetensors"): _load_tensors(ckpt_dir / name, sha, "meta.json")
        for name, sha in meta["sha256"].items()
    }
    return meta, tensors


# ---------------------------------------------------------------------------------------- state loading
def check_config(expected: dict, found: dict, what: str) -> None:
    """Raise naming every key whose value differs between two architecture configs."""
    keys = sorted(set(expected) | set(found))
    diffs = [
        f"{k}: checkpoint has {found.get(k)!r}, model has {expected.get(k)!r}"
        for k in keys
        if _norm(expected.get(k)) != _norm(found.get(k))
    ]
    if diffs:
        raise CheckpointError(f"{what} was saved from another architecture:\n  " + "\n  ".join(diffs))


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` with one message listing missing, unexpected and mis-shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{what} does not fit the model — " + "; ".join(problems))
    module.load_state_dict(state)


# ---------------------------------------------------------------------------------------- exported models
def save_model(path: str | Path, model: torch.nn.Module, meta: dict) -> Path:
    """Write `path` (.safetensors) and its sidecar `path.with_suffix('.json')` atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"model files end in .safetensors, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # the sidecar marks the file complete: an old one goes first, so a kill before the new one leaves no sidecar
    # (the file is then not current, and the stage that writes it runs again) rather than a mismatched one
    path.with_suffix(".json").unlink(missing_ok=True)
    _save_tensors(model.state_dict(), path)
    sidecar = {"format": FORMAT + "-model", "version": VERSION, **meta, "sha256": sha256_file(path)}
    atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=1) + "\n")
    return path


def model_identity(path: str | Path) -> str:
    """Identity of a model source: sha256 of an exported file, or the checkpoint a run directory resolves to."""
    path = shipped_path(path)
    if path.is_file():
        return sha256_file(path)
    sidecar, _ = read_model_file(path)
    return f"{sidecar.get('source')}@{sidecar.get('step')}"


def read_model_file(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(sidecar, weights) of an exported model, or the EMA (else raw) weights of a training checkpoint."""
    path = shipped_path(path)
    if path.is_dir():  # a run directory, a checkpoints/ directory, or one ckpt-<step>/ directory
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        ckpt = latest_checkpoint(root) or path
        meta, tensors = load_training_checkpoint(ckpt)
        return {
            "model": meta["config"].get("model", {}),
            "pruning": meta["config"].get("pruning"),
            "weight_masks": meta["config"].get("weight_masks"),
            "step": meta["step"],
            "source": str(ckpt),
        }, tensors.get("ema", tensors["model"])
    if not path.is_file():
        raise CheckpointError(f"no model file at {str(path)!r}")
    sidecar_path = path.with_suffix(".json")
    if not sidecar_path.is_file():
        raise CheckpointError(
            f"{str(path)!r} has no sidecar {sidecar_path.name!r} describing its architecture (an export interrupted "
            "before its sidecar was written: run the stage that made it again)"
        )
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(sidecar_path)!r} is corrupt: {err}") from None
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"{str(sidecar_path)!r} is not a model sidecar: it holds a {type(sidecar).__name__}")
    if not isinstance(sidecar.get("sha256"), str):
        raise CheckpointError(
            f"{str(sidecar_path)!r} records no sha256 of {path.name!r}, so the weights cannot be checked; "
            "re-export the model (slimflow.checkpoint.save_model writes it)"
        )
    return sidecar, _load_tensors(path, sidecar["sha256"], sidecar_path.name)
