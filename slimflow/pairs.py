"""Reflow pair store: (noise, teacher image) pairs, with the noise regenerated from (seed, index), never stored.

Noise of pair i (scheme `NOISE_SCHEME`): a CPU `torch.Generator` (mt19937) seeded with `noise_seed(seed, i)` draws
`torch.randn(shape, dtype=float64)`, rounded to float32. The float64 draw takes torch's scalar path, so the values
are the same on every CPU kernel (default/AVX2/AVX-512), whatever batch, rank or device asks for them; torch's RNG
is the one dependency, and the manifest records a fingerprint of the noise that every reader re-checks.

On disk (`out_dir`):
- `shard_00012.safetensors`: `index` int64 (count,) and `image` (count, *shape) as float16 (values kept) or uint8
  (q = round_half_even((clamp(x, -1, 1) + 1) * 127.5), read back as q / 127.5 - 1; error <= 1/255 inside [-1, 1]).
  Shard k holds the pairs [k * shard_size, min(n, (k + 1) * shard_size)), solved in batches of `batch_size`.
  A class-conditional teacher's store keeps no labels either: pair i's label is `labels_for(i, seed, num_classes)`
  (`LABEL_SCHEME`), regenerated like its noise; the manifest records num_classes, the scheme and the teacher's
  classifier-free guidance scale (these keys exist only in conditional stores).
- `shard_00012.json`: that shard's record (file, sha256, bytes, count, index range, NFE, seconds, and the sha256 of
  the settings it was made with), written after it.
- `manifest.json`: the settings, status ("running" until every shard is written, then "complete"), NFE per pair,
  throughput, times, and all shard records.
Every file is written to a hidden temp file and renamed; a restart removes leftover temp files, re-checks each
shard against its record and regenerates only the missing or damaged ones.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from slimflow.checkpoint import atomic_file, atomic_write_text, content_hash, sha256_file, shipped_path
from slimflow.engine import dist_info
from slimflow.flow import _MASK32, LABEL_SCHEME, NOISE_SCHEME, _as_indices, labels_for, noise_for
from slimflow.sample import check_guidance, conditioned
from slimflow.solvers import solve
from teachers.zoo import load_model

FORMAT = "slimflow-pairs"
VERSION = 1
IMAGE_FORMATS = ("float16", "uint8")
SOLVER_KEYS = ("method", "steps", "rtol", "atol", "max_steps")
# Keys of the manifest that must be equal for two runs to write into the same store.
SETTINGS_KEYS = (
    "format",
    "version",
    "noise_scheme",
    "noise_check",
    "count",
    "shape",
    "seed",
    "image_format",
    "solver",
    "teacher_hash",
    "shard_size",
    "batch_size",
)
CONDITIONAL_KEYS = ("num_classes", "label_scheme", "guidance")  # only in the manifest of a conditional store
log = logging.getLogger(__name__)


class PairStoreError(RuntimeError):
    """A pair store that is unfinished, corrupt, or was made with other settings."""


# ------------------------------------------------------------------------------------------------- noise
def _noise_check(n: int, seed: int, shape: Sequence[int]) -> str:
    """sha256 of the noise of the first and last pair: detects a torch whose RNG no longer gives the same noise."""
    return hashlib.sha256(noise_for([0, n - 1], seed, shape).numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------- image formats
def encode_images(images: torch.Tensor, image_format: str) -> torch.Tensor:
    """Float images in [-1, 1] to their stored form (see the module docstring)."""
    if image_format == "float16":
        return images.to(torch.float16)
    if image_format == "uint8":
        return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    raise ValueError(f"unknown image_format {image_format!r}: use one of {IMAGE_FORMATS}")


def decode_images(stored: torch.Tensor, image_format: str) -> torch.Tensor:
    """Stored images back to float32 in [-1, 1]."""
    if image_format == "float16":
        return stored.to(torch.float32)
    if image_format == "uint8":
        return stored.to(torch.float32) / 127.5 - 1.0
    raise ValueError(f"unknown image_format {image_format!r}: use one of {IMAGE_FORMATS}")


# ------------------------------------------------------------------------------------------------ layout
def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of every shard."""
    return [(start, min(n, start + shard_size)) for start in range(0, n, shard_size)]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PairStoreError(f"{path} is not valid JSON ({err}); delete it or the whole store and regenerate") from None
    if not isinstance(data, dict):
        raise PairStoreError(f"{path} holds a {type(data).__name__}, not a record; delete it and regenerate")
    return data


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


# ------------------------------------------------------------------------------------------- generation
def _settings(
    n: int,
    shape: Sequence[int],
    seed: int,
    solver: dict,
    shard_size: int,
    batch_size: int,
    image_format: str,
    teacher_hash: str,
    num_classes: int = 0,
    guidance: float = 1.0,
) -> dict:
    if not isinstance(n, int) or not 1 <= n <= _MASK32 + 1:
        raise ValueError(f"n must be an int in [1, 2^32], got {n!r}")
    if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive ints (one pair, no batch dim), got {shape!r}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image_format {image_format!r}: use one of {IMAGE_FORMATS}")
    if "method" not in solver or set(solver) - set(SOLVER_KEYS):
        raise ValueError(f"solver must be a dict with 'method' and optionally {SOLVER_KEYS[1:]}, got {solver!r}")
    settings = {
        "format": FORMAT,
        "version": VERSION,
        "noise_scheme": NOISE_SCHEME,
        "noise_check": _noise_check(n, seed, shape),
        "count": n,
        "shape": list(shape),
        "seed": seed,
        "image_format": image_format,
        "solver": dict(solver),
        "teacher_hash": teacher_hash,
        "shard_size": shard_size,
        "batch_size": batch_size,
    }
    if num_classes:
        settings.update(num_classes=num_classes, label_scheme=LABEL_SCHEME, guidance=float(guidance))
    return json.loads(json.dumps(settings))  # the form it takes in manifest.json


def _check_settings(existing: dict, wanted: dict, root: Path) -> None:
    diffs = [
        f"{key}: store has {existing.get(key)!r}, requested {wanted.get(key)!r}"
        for key in SETTINGS_KEYS + CONDITIONAL_KEYS
        if existing.get(key) != wanted.get(key)
    ]
    if diffs:
        raise PairStoreError(
            f"the pair store in {root} was made with other settings; pairs from two settings are "
            "never mixed. Use another out_dir, or delete this one to start over. Differences:\n  " + "\n  ".join(diffs)
        )


def _remove_temp_files(root: Path) -> None:
    for path in root.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)


def _finished_shard(root: Path, k: int, start: int, stop: int, settings_sha256: str, warn: bool = True) -> dict | None:
    """The record of shard k if it was made with these settings and its file matches its size and sha256."""
    path, sidecar = root / shard_name(k), (root / shard_name(k)).with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        return None
    warning = log.warning if warn else log.debug
    try:
        record = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        warning("%s: unreadable record, regenerating the shard", sidecar)
        return None
    if (record.get("start"), record.get("stop"), record.get("settings_sha256")) != (start, stop, settings_sha256):
        warning("%s: made for other pairs or settings than this store's; regenerating", sidecar)
        return None
    if path.stat().st_size != record.get("bytes") or sha256_file(path) != record.get("sha256"):
        warning("%s: size or sha256 differs from its record, regenerating", path)
        return None
    return record


@contextmanager
def _eval_mode(velocity: Callable) -> Iterator[None]:
    """Run a module teacher in eval mode (no dropout), restoring its mode afterwards."""
    was_training = isinstance(velocity, torch.nn.Module) and velocity.training
    if was_training:
        velocity.eval()
    try:
        yield
    finally:
        if was_training:
            velocity.train()


def _device_of(velocity: Callable) -> torch.device:
    """The teacher module's device; a plain function runs where the noise is made (the CPU)."""
    if isinstance(velocity, torch.nn.Module):
        tensor = next(itertools.chain(velocity.parameters(), velocity.buffers()), None)
        if tensor is not None:
            return tensor.device
    return torch.device("cpu")


def _make_shard(
    velocity: Callable, root: Path, k: int, start: int, stop: int, settings: dict, device: torch.device, bar: tqdm
) -> None:
    """Solve the teacher ODE for pairs [start, stop), write the shard and then its record."""
    began = time.perf_counter()
    images, nfe_total = [], 0
    for first in range(start, stop, settings["batch_size"]):
        indices = torch.arange(first, min(stop, first + settings["batch_size"]))
        noise = noise_for(indices, settings["seed"], settings["shape"], device=device)
        labels = None
        if settings.get("num_classes"):
            labels = labels_for(indices, settings["seed"], settings["num_classes"]).to(device)
        field = conditioned(velocity, labels, settings.get("guidance", 1.0))
        solution = solve(field, noise, **settings["solver"])
        if not torch.isfinite(solution.x).all():
            raise PairStoreError(
                f"the teacher ODE gave non-finite images for pairs [{first}, {int(indices[-1]) + 1})"
                f" with solver {settings['solver']}; check the teacher and the solver settings"
            )
        images.append(encode_images(solution.x.detach().cpu(), settings["image_format"]))
        nfe_total += int(solution.nfe) * len(indices)
        bar.update(len(indices))
    path = root / shard_name(k)
    with atomic_file(path) as tmp:
        save_file({"index": torch.arange(start, stop), "image": torch.cat(images)}, str(tmp))
    record = {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "count": stop - start,
        "start": start,
        "stop": stop,
        "nfe_total": nfe_total,
        "seconds": time.perf_counter() - began,
        "settings_sha256": content_hash(settings),
    }
    _write_json(path.with_suffix(".json"), record)


def _finished_manifest(root: Path, head: dict, ranges: list[tuple[int, int]]) -> dict:
    records = []
    for k, (start, stop) in enumerate(ranges):
        record = _read_json((root / shard_name(k)).with_suffix(".json"))
        if (record["start"], record["stop"]) != (start, stop):
            raise PairStoreError(
                f"record of {shard_name(k)} in {root} covers [{record['start']}, {record['stop']}),"
                f" expected [{start}, {stop})"
            )
        records.append(record)
    count = sum(r["count"] for r in records)
    nfe_total = sum(r["nfe_total"] for r in records)
    return {
        **head,
        "status": "complete",
        "finished": _now(),
        "nfe_total": nfe_total,
        "nfe_per_pair_mean": nfe_total / count,
        "pairs_per_s": count / max(sum(r["seconds"] for r in records), 1e-9),
        "shards": records,
    }


def generate_pairs(
    velocity: Callable,
    out_dir: str | Path,
    n: int,
    shape: Sequence[int],
    seed: int,
    solver: dict,
    shard_size: int = 1000,
    batch_size: int = 250,
    image_format: str = "float16",
    teacher_hash: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    guidance: float = 1.0,
) -> dict:
    """Solve the teacher ODE dx/dt = velocity(x, t) from t = 0 to 1 for the noise of pairs 0..n-1; write the store.

    `solver`: keyword arguments of `slimflow.solvers.solve` (method, steps, rtol, atol, max_steps).
    `teacher_hash` defaults to `content_hash(velocity)` for a module and is required for a plain function.
    `device` defaults to the teacher's. A class-conditional teacher (`num_classes` > 0) is solved under the labels
    of the pairs, with classifier-free guidance scale `guidance` (1: none). Resumable: a rerun with the same settings keeps the shards that check out
    and makes the rest; other settings raise `PairStoreError`. Under torch.distributed every rank must call this;
    shards are dealt round-robin to ranks, rank 0 writes the manifest. Returns the manifest ("pairs_per_s" is per
    worker, from shard timings).
    """
    if teacher_hash is None:
        if not isinstance(velocity, torch.nn.Module):
            raise ValueError(
                "teacher_hash is required when velocity is a plain function (it is computed with "
                "content_hash only for an nn.Module)"
            )
        teacher_hash = content_hash(velocity)
    root = Path(out_dir)
    num_classes = int(getattr(velocity, "num_classes", 0) or 0)
    guidance = check_guidance(velocity, guidance)
    settings = _settings(
        n, shape, seed, solver, shard_size, batch_size, image_format, teacher_hash, num_classes, guidance
    )
    device = torch.device(device) if device is not None else _device_of(velocity)
    rank, world = dist_info()
    root.mkdir(parents=True, exist_ok=True)
    complete = _complete_manifest(root, settings, rank, world)
    if complete is not None:
        return complete
    with _writer_lock(root, rank):
        return _generate(velocity, root, settings, device, rank, world, progress)


def _complete_manifest(root: Path, settings: dict, rank: int, world: int) -> dict | None:
    """The manifest of a store that is complete with these settings, when every shard and the manifest's copy of
    their records check out; otherwise None (something is to be made or repaired, under the writer lock).

    It reads only and takes no lock, so runs that share a finished store start side by side while another checks
    it. That is safe: a writer with the same settings finds the store complete too and writes nothing, and one with
    other settings is refused by `_check_settings`."""
    path = root / "manifest.json"
    manifest = _read_json(path) if path.is_file() else None
    if manifest is not None:
        _check_settings(manifest, settings, root)
    ranges, fingerprint = shard_ranges(settings["count"], settings["shard_size"]), content_hash(settings)
    complete = manifest is not None and manifest.get("status") == "complete"
    complete = complete and all(
        _finished_shard(root, k, *ranges[k], fingerprint, warn=False) is not None
        for k in range(rank, len(ranges), world)
    )
    if complete and rank == 0:
        complete = _shard_records(root, manifest, ranges) == manifest["shards"]
    if world > 1:
        verdicts: list[bool] = [False] * world
        dist.all_gather_object(verdicts, complete)
        complete = all(verdicts)
    return manifest if complete else None


def _shard_records(root: Path, manifest: dict, ranges: list[tuple[int, int]]) -> list[dict]:
    """The shard records as the finished shards give them now, to compare with the manifest's copy of them."""
    head = {k: v for k, v in manifest.items() if k not in ("status", "shards")}
    return _finished_manifest(root, head, ranges)["shards"]


@contextmanager
def _writer_lock(root: Path, rank: int) -> Iterator[None]:
    """One writer per store: rank 0 of a run holds an exclusive lock on root/.lock while it makes or repairs the
    store; another process that tries is stopped with a message (its ranks, sharing one run, do not lock). A
    store found complete is read without it (`_complete_manifest`)."""
    if rank != 0:
        yield
        return
    with open(root / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PairStoreError(
                f"another process is writing the pair store {root} (it holds {root / '.lock'}); wait for it to "
                "finish and run this again (it then resumes or finds the store complete), or use another out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate(velocity, root: Path, settings: dict, device, rank: int, world: int, progress: bool) -> dict:
    manifest_path = root / "manifest.json"
    n, shard_size = settings["count"], settings["shard_size"]
    existing = _read_json(manifest_path) if manifest_path.is_file() else None
    if existing is not None:
        _check_settings(existing, settings, root)
    head = existing or {**settings, "status": "running", "created": _now(), "torch_version": torch.__version__}
    if rank == 0:
        _remove_temp_files(root)
        if existing is None:
            _write_json(manifest_path, head)

    ranges = shard_ranges(n, shard_size)
    fingerprint = content_hash(settings)
    missing = [k for k in range(rank, len(ranges), world) if _finished_shard(root, k, *ranges[k], fingerprint) is None]
    if world > 1:
        gathered: list[list[int]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, missing)
        missing = sorted(k for part in gathered for k in part)
    if not missing and head["status"] == "complete":
        if rank == 0:  # the shards check out; a manifest whose copy of their records was altered is rewritten
            records = _shard_records(root, head, ranges)
            if records != head["shards"]:
                log.warning("%s: its shard records differ from the shards' own; rewriting it", manifest_path)
                head = {**head, "shards": records}
                _write_json(manifest_path, head)
        if world > 1:
            dist.barrier()
        return _read_json(manifest_path)
    if rank == 0 and head["status"] == "complete":  # some shard was lost or damaged: being repaired
        _write_json(manifest_path, {**head, "status": "running"})

    todo = missing[rank::world]
    total = sum(ranges[k][1] - ranges[k][0] for k in todo)
    with (
        _eval_mode(velocity),
        torch.no_grad(),
        tqdm(total=total, unit="pair", desc=f"pairs {root.name}", disable=not progress or rank != 0) as bar,
    ):
        for k in todo:
            _make_shard(velocity, root, k, *ranges[k], settings, device, bar)
    if world > 1:
        dist.barrier()
    if rank == 0:
        _write_json(manifest_path, _finished_manifest(root, {k: v for k, v in head.items() if k != "status"}, ranges))
    if world > 1:
        dist.barrier()
    return _read_json(manifest_path)


# ------------------------------------------------------------------------------------------------ reading
class PairStore:
    """Read-only view of a finished pair store; streams images from memory-mapped shards.

    At open: the manifest must be complete, every shard file present with its recorded size, and the noise this
    torch regenerates must match the store's fingerprint. Each shard's sha256 is checked the first time it is read
    (`verify()` checks them all now). The `open_shards` most recently used shards stay mapped.
    """

    def __init__(self, out_dir: str | Path, open_shards: int = 4):
        self.root = Path(out_dir)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"no pair store at {self.root}: {path} is missing; make one with generate_pairs")
        manifest = _read_json(path)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise PairStoreError(
                f"{path} is not a {FORMAT} v{VERSION} manifest "
                f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})"
            )
        if manifest.get("status") != "complete":
            raise PairStoreError(
                f"the pair store in {self.root} is unfinished (status {manifest.get('status')!r});"
                " rerun generate_pairs with the same settings to complete it"
            )
        self.manifest = manifest
        self.shape: tuple[int, ...] = tuple(manifest["shape"])
        self.seed: int = manifest["seed"]
        self.image_format: str = manifest["image_format"]
        self.shard_size: int = manifest["shard_size"]
        self.num_classes: int = int(manifest.get("num_classes") or 0)
        self._records: list[dict] = manifest["shards"]
        self._open_limit = max(1, open_shards)
        self._open: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._verified: set[int] = set()
        self._check_files()
        if _noise_check(len(self), self.seed, self.shape) != manifest["noise_check"]:
            raise PairStoreError(
                f"the noise this torch ({torch.__version__}) regenerates for the store in {self.root} differs from the "
                f"noise its pairs were made from (torch {manifest.get('torch_version')}); the pairs would be "
                "decoupled. Read it with the torch version that made it, or regenerate the store"
            )

    def __len__(self) -> int:
        return self.manifest["count"]

    def _check_files(self) -> None:
        missing = [r["file"] for r in self._records if not (self.root / r["file"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"pair store {self.root} lacks {len(missing)} shard file(s): {', '.join(missing)};"
                " rerun generate_pairs with the same settings to regenerate them"
            )
        wrong = [
            f"{r['file']} ({(self.root / r['file']).stat().st_size} bytes, manifest says {r['bytes']})"
            for r in self._records
            if (self.root / r["file"]).stat().st_size != r["bytes"]
        ]
        if wrong:
            raise PairStoreError(
                f"pair store {self.root} has truncated or altered shards: {', '.join(wrong)}; rerun "
                "generate_pairs with the same settings to regenerate them"
            )

    def _verify_shard(self, k: int) -> None:
        record = self._records[k]
        path = self.root / record["file"]
        if not path.is_file():
            raise FileNotFoundError(
                f"shard {record['file']} of the pair store {self.root} is missing; rerun "
                "generate_pairs with the same settings to regenerate it"
            )
        actual = sha256_file(path)
        if actual != record["sha256"]:
            raise PairStoreError(
                f"shard {record['file']} of the pair store {self.root} is corrupt: sha256 {actual}, "
                f"manifest expects {record['sha256']}; rerun generate_pairs with the same settings "
                "to regenerate it"
            )
        self._verified.add(k)

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest now."""
        self._check_files()
        for k in range(len(self._records)):
            self._verify_shard(k)

    def _images(self, k: int) -> torch.Tensor:
        """Stored images of shard k, memory-mapped (pages are read when indexed)."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        if k not in self._verified:
            self._verify_shard(k)
        with safe_open(str(self.root / self._records[k]["file"]), framework="pt") as handle:
            images = handle.get_tensor("image")
        self._open[k] = images
        if len(self._open) > self._open_limit:
            self._open.popitem(last=False)
        return images

    def get(self, indices: int | Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, image) of the pairs `indices`, float32 (B, *shape) on the CPU, in the order asked.

        Indices are grouped by shard, so a random batch costs one gather per shard it touches.
        """
        idx = _as_indices(indices)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(
                f"pair indices must lie in [0, {len(self)}), got min {int(idx.min())}, max {int(idx.max())}"
            )
        images = torch.empty((len(idx), *self.shape), dtype=torch.float32)
        shard_of = idx // self.shard_size
        for k in shard_of.unique().tolist():
            rows = (shard_of == k).nonzero().squeeze(1)
            images[rows] = decode_images(self._images(k)[idx[rows] - self._records[k]["start"]], self.image_format)
        return noise_for(idx, self.seed, self.shape), images

    def labels(self, indices: int | Sequence[int] | torch.Tensor) -> torch.Tensor | None:
        """The class labels of pairs `indices` (int64, regenerated from (seed, index)); None for an unconditional
        store."""
        if not self.num_classes:
            return None
        idx = _as_indices(indices)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(
                f"pair indices must lie in [0, {len(self)}), got min {int(idx.min())}, max {int(idx.max())}"
            )
        return labels_for(idx, self.seed, self.num_classes)

    def batch(
        self, indices: int | Sequence[int] | torch.Tensor, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training fast path: `get(indices)` moved to `device` (pinned, non-blocking copies to a CUDA device)."""
        noise, images = self.get(indices)
        if device is None or torch.device(device).type == "cpu":
            return noise, images
        if torch.device(device).type == "cuda":
            noise, images = noise.pin_memory(), images.pin_memory()
        return noise.to(device, non_blocking=True), images.to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------ stores as inputs
def open_pairs(path: str | Path, teacher: str | Path | None = None) -> PairStore:
    """The finished pair store at `path`; with `teacher`, it must have been made by that teacher's weights."""
    store = PairStore(path)
    if teacher is not None:
        if not shipped_path(teacher).exists():
            raise FileNotFoundError(
                f"teacher file {str(teacher)!r} does not exist (needed to check that the pairs in "
                f"{path} were made by it)"
            )
        wanted = content_hash(load_model(teacher))
        if store.manifest["teacher_hash"] != wanted:
            raise PairStoreError(
                f"the pair store {path} was made by another teacher (teacher_hash "
                f"{store.manifest['teacher_hash'][:16]}…, {teacher} hashes to {wanted[:16]}…); "
                "generate pairs with this teacher into another folder"
            )
    return store


def pairs_hash(store: PairStore) -> str:
    """Identity of a store's pairs: its manifest's settings and every shard's checksum (not timings)."""
    manifest = store.manifest
    return content_hash(
        {
            **{key: manifest[key] for key in SETTINGS_KEYS + CONDITIONAL_KEYS if key in manifest},
            "shards": [r["sha256"] for r in manifest["shards"]],
        }
    )


def pairs_record(store: PairStore) -> dict:
    """What a student's sidecar records about the pairs it was trained on."""
    return {
        "dir": str(store.root),
        "hash": pairs_hash(store),
        "teacher_hash": store.manifest["teacher_hash"],
        "count": len(store),
        "solver": store.manifest["solver"],
        **({"num_classes": store.num_classes, "guidance": store.manifest["guidance"]} if store.num_classes else {}),
    }


def store_status(root: str | Path) -> str | None:
    """The status of the store's manifest ("running", "complete"), or None when there is no manifest yet."""
    path = Path(root) / "manifest.json"
    return _read_json(path).get("status") if path.is_file() else None
