"""Benchmark: sample quality (FID/KID/precision-recall per extractor) against size, MACs, NFE and latency.

`bench(cfg)` first runs the `prepare` stages that make the models (pipelines, pruning; each resumes or is skipped
when current), then evaluates each entry (a model file sampled with one solver setting, or an ONNX file written by
`slimflow export`, fp32 or int8, run by onnxruntime on CPU: one step, same noise; MACs and peak memory n/a) and
writes to `cfg.out`:
- `entries/<name>.json`: one entry's result with a fingerprint of everything it depends on (entry, model file
  hash, feature extractors including the domain net's weights hash, reference, metric and cost settings,
  device, torch version); a re-run skips entries whose fingerprint still matches, so an interrupted benchmark
  resumes where it stopped, and recomputes the others.
- `bench.csv`, `bench.md` (the table; metric columns are named by extractor, e.g. "FID (domain)"; the `compare`
  pairs as a second table with the relative FID change),
- `fid_vs_params.png`, `fid_vs_macs.png`, `fid_vs_latency.png` (log-x, labelled points, Pareto front highlighted;
  y is the FID of the first extractor listed; x the params, the MACs per sample (all NFE; ONNX entries, which
  have none, are left out) and the latency at the smallest batch size),
- `samples/<name>.png` (a grid of the entry's first samples) and TensorBoard under `tb/` (the table as text, the
  figures, and `tb/<name>/`: one hparams run per entry, its settings and numbers, which the HPARAMS tab shows as
  one table; rewritten on each run),
- `bench.json`: the rows, the config, the date and the machine.

A class-conditional entry (a model with `num_classes`, or an ONNX generator with a `label` input) is sampled
class-balanced (sample i of class i mod K, the same noise (seed, i)), so its FID compares a class-balanced set with
the reference; its row adds "class accuracy (domain)": the share of samples the domain net's classifier head assigns
to the requested class (for a K equal to the classifier's class count; else n/a). The column appears only when a
row has it, and only conditional entries' fingerprints record the labelling.
"""

from __future__ import annotations

import copy
import csv
import datetime
import io
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from slimflow.checkpoint import (
    atomic_file,
    atomic_write_text,
    content_hash,
    model_identity,
    require_writable,
    shipped_path,
)
from slimflow.config import load_config
from slimflow.cost import measure_cost
from slimflow.data import to_float, to_uint8
from slimflow.domain_net import DEFAULT_WEIGHTS as DOMAIN_WEIGHTS
from slimflow.domain_net import load_domain_net
from slimflow.engine import resolve_device
from slimflow.flow import balanced_labels
from slimflow.images import save_grid
from slimflow.metrics import (
    CLASS_ACCURACY,
    class_accuracy,
    compute_metrics,
    metric_label,
    metric_labels,
    reference_images,
    resolve_extractor,
)
from slimflow.sample import num_classes, sample
from slimflow.solvers import METHODS
from slimflow.stages import CONFIG_STAGES, run_stage, stage
from slimflow.stages.export import OnnxGenerator
from slimflow.stages.runner import full_config
from teachers.zoo import load_model

DEFAULTS: dict = {
    "out": "runs/bench",
    "device": "auto",
    "reference": {"name": "fashion_mnist", "split": "test", "root": None, "image_size": 32, "n": None},
    "metrics": {
        "extractors": ["domain"],  # domain | inception; the first one is plotted
        "n_samples": 2000,
        "seed": 0,  # noise of sample i is drawn from (seed, i)
        "batch_size": 256,  # sampling and feature extraction
        "kid_subsets": 100,
        "kid_subset_size": None,  # None: min(1000, n_samples, reference size)
        "prc_neighborhood": 3,
        "domain_weights": None,  # None: the committed domain net
        "inception_weights": None,  # path to weights-inception-2015-12-05-6726825d.pth (else the torch hub cache)
        "cache_dir": "runs/metrics-cache",
    },
    "cost": {"batch_sizes": [1, 64], "warmup": 2, "repeats": 10},
    "grid": 64,  # samples per entry saved as samples/<name>.png (0: none)
    "entries": [],  # each {name, model, method, steps, tol}
    # Runs that make the entries' models, in order, before any evaluation: each {stage, config, overrides}
    # with stage one of PREPARE_STAGES; each is skipped or resumed when its outputs are current or partial.
    "prepare": [],
    # Pairs of entries to set side by side in bench.md: each {label, baseline, candidate} (entry names).
    "compare": [],
}
HELP: dict[str, str] = {  # what each setting means (`--help-config`; tests/test_help_config.py checks all have one)
    "out": "folder: bench.md, bench.csv, bench.json, figures, samples/, entries/ (cached results), tb/",
    "device": "auto (GPU when available) | cpu | cuda | cuda:N",
    "reference.name": "reference image set of FID/KID/precision/recall",
    "reference.split": "its split (train | test)",
    "reference.root": "folder of the data set (null: the default location)",
    "reference.image_size": "reference images are resized to this many pixels a side",
    "reference.n": "reference images used (null: all)",
    "metrics.extractors": "feature extractors: domain | inception (the first one is plotted)",
    "metrics.n_samples": "samples generated per entry",
    "metrics.seed": "noise of sample i is drawn from (seed, i)",
    "metrics.batch_size": "batch of sampling and feature extraction",
    "metrics.kid_subsets": "KID: number of subsets",
    "metrics.kid_subset_size": "KID: subset size (null: min(1000, n_samples, reference size))",
    "metrics.prc_neighborhood": "precision/recall: k of the k-NN balls",
    "metrics.domain_weights": "domain net weights (null: the committed domain net)",
    "metrics.inception_weights": "path to weights-inception-2015-12-05-6726825d.pth (null: the torch hub cache)",
    "metrics.cache_dir": "torch-fidelity's cache of reference features",
    "cost.batch_sizes": "batch sizes of the latency measures (memory at the largest)",
    "cost.warmup": "untimed generations before the latency is measured",
    "cost.repeats": "timed generations (the median is reported)",
    "grid": "samples per entry saved as samples/<name>.png (0: none)",
    "entries": "what is benchmarked: each {name, model, method, steps, tol}",
    "prepare": "runs that make the entries' models first: each {stage, config, overrides}",
    "compare": "pairs of entries set side by side in bench.md: each {label, baseline, candidate}",
}
PREPARE_STAGES = tuple(name for name in CONFIG_STAGES if name not in ("bench", "fid"))  # the stages that make models
ENTRY_DEFAULTS = {"method": "euler", "steps": 1, "tol": 1e-5}
ENTRY_KEYS = ("name", "model", *ENTRY_DEFAULTS)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# ------------------------------------------------------------------------------------------- config
def check_entries(entries: list) -> list[dict]:
    """Entries with defaults filled in; unknown keys, missing name/model, bad names or methods are errors."""
    if not isinstance(entries, list) or not entries:
        raise ValueError("bench needs a non-empty list `entries`, each {name, model, method, steps, tol}")
    out, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"entries[{i}] must be a mapping, got {entry!r}")
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        missing = [k for k in ("name", "model") if k not in entry]
        if unknown or missing:
            raise ValueError(
                f"entries[{i}] ({entry.get('name', '?')}): unknown keys {unknown}, missing {missing}; "
                f"an entry has {list(ENTRY_KEYS)}"
            )
        entry = {**ENTRY_DEFAULTS, **entry}
        name = str(entry["name"])
        if not NAME_PATTERN.match(name):
            raise ValueError(
                f"entries[{i}]: name {name!r} must be letters, digits, '.', '_', '+' or '-' (it names files)"
            )
        if name in seen:
            raise ValueError(f"entries[{i}]: name {name!r} is used twice")
        if entry["method"] not in METHODS:
            raise ValueError(f"entries[{i}] ({name}): unknown method {entry['method']!r}; choose one of {METHODS}")
        if is_onnx(entry["model"]) and (entry["method"], entry["steps"]) != ("euler", 1):
            raise ValueError(
                f"entries[{i}] ({name}): {entry['model']} is an exported one-step generator (ONNX): it takes "
                f"method euler, steps 1, got {entry['method']}, {entry['steps']}"
            )
        seen.add(name)
        out.append(entry)
    return out


def is_onnx(model: str | Path) -> bool:
    """An entry's model is an exported ONNX generator (run by onnxruntime on CPU, see export.OnnxGenerator)."""
    return Path(model).suffix == ".onnx"


def check_prepare(items: list) -> list[dict]:
    """The `prepare` items with their configs loaded (defaults ← config file ← overrides) and checked by their
    stage, so a bad setting in the last stage stops the benchmark before the first one runs."""
    if not isinstance(items, list):
        raise ValueError("prepare must be a list of {stage, config, overrides}")
    loaded = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"stage", "config", "overrides"} or "stage" not in item:
            raise ValueError(f"prepare[{i}] must be a mapping with keys stage, config, overrides; got {item!r}")
        if item["stage"] not in PREPARE_STAGES:
            raise ValueError(
                f"prepare[{i}]: unknown stage {item['stage']!r}; choose one of {', '.join(PREPARE_STAGES)}"
            )
        module, run = stage(item["stage"])
        cfg = load_config(module.DEFAULTS, item.get("config"), item.get("overrides") or [])
        module.check_config(cfg)
        loaded.append(
            {
                "stage": item["stage"],
                "run": run,
                "config": cfg,
                "label": " ".join([item["stage"], str(item.get("config")), *(item.get("overrides") or [])]),
            }
        )
    return loaded


def run_prepare(items: list[dict], command: str | None) -> None:
    """Run each loaded prepare item in order (each writes its own summary)."""
    for i, item in enumerate(items):
        print(f"bench: prepare {i + 1}/{len(items)}: {item['label']}", file=sys.stderr)
        run_stage(item["run"], item["config"], f"{command or shlex.join(sys.orig_argv)} (prepare {i + 1})")


def comparison_table(rows: list[dict], pairs: list, extractor: str) -> str:
    """Markdown: for each {label, baseline, candidate}, both FIDs of `extractor` and the candidate's relative
    change (negative: the candidate is better)."""
    by_name = {r["name"]: r for r in rows}
    fid = metric_label("fid", extractor)
    lines = [f"| comparison | baseline | {fid} | candidate | {fid} | change |", "|---|---|---|---|---|---|"]
    for pair in pairs:  # names checked by bench() before any work
        a, b = by_name[pair["baseline"]][fid], by_name[pair["candidate"]][fid]
        lines.append(
            f"| {pair.get('label', '')} | {pair['baseline']} | {a:.4g} | {pair['candidate']} | {b:.4g} | "
            f"{100 * (b - a) / a:+.1f}% |"
        )
    return "\n".join(lines) + "\n"


def fingerprint(entry: dict, cfg: dict, device: torch.device, extractor_ids: dict[str, str]) -> str:
    """Hash of everything an entry's result depends on (extractor_ids: the registered extractor names, which
    include the domain net's weights hash)."""
    blob = {
        "entry": entry,
        "model": model_identity(entry["model"]),
        "extractors": extractor_ids,
        "reference": cfg["reference"],
        "metrics": {k: v for k, v in cfg["metrics"].items() if k != "cache_dir"},
        "cost": cfg["cost"],
        "device": str(device),
        "torch": torch.__version__,
    }
    classes = entry_classes(entry["model"])
    if classes:  # only conditional entries: unconditional fingerprints are those of before
        blob["labels"] = {"num_classes": classes, "sampling": "balanced", "accuracy": "domain classifier head"}
        blob["classifier"] = model_identity(cfg["metrics"]["domain_weights"] or DOMAIN_WEIGHTS)
    return content_hash(blob)


def entry_classes(model: str | Path) -> int:
    """The class count of an entry's model (0: unconditional), read from its sidecar or ONNX metadata without
    loading it."""
    path = shipped_path(model)
    if is_onnx(path):
        return OnnxGenerator.classes_of(path)
    sidecar = path.with_suffix(".json")
    if path.suffix == ".safetensors" and sidecar.is_file():
        try:
            return int((json.loads(sidecar.read_text()).get("model") or {}).get("num_classes") or 0)
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            return 0
    return 0


# ------------------------------------------------------------------------------------------- table
def columns(cfg: dict) -> list[tuple[str, str]]:
    """(result key, table header) of every column, metric columns named by their extractor."""
    batches = sorted(cfg["cost"]["batch_sizes"])
    cols = [
        ("name", "name"),
        ("solver", "solver"),
        ("steps", "steps"),
        ("nfe", "NFE"),
        ("params", "params (M)"),
        ("macs_per_nfe", "MACs/NFE (M)"),
        ("macs_per_sample", "MACs/sample (M)"),
    ]
    cols += [(f"latency_ms_b{b}", f"latency b{b} (ms/img)") for b in batches]
    cols.append((f"peak_mem_mib_b{batches[-1]}", f"peak mem b{batches[-1]} (MiB)"))
    cols += [(label, label) for extractor in cfg["metrics"]["extractors"] for label in metric_labels(extractor)]
    return cols


def _format(key: str, value) -> str:
    if value is None:
        return "n/a"
    if key in ("params", "macs_per_nfe", "macs_per_sample"):
        return f"{value / 1e6:.3f}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def write_csv(rows: list[dict], cols: list[tuple[str, str]], path: Path) -> None:
    """Raw values (params and MACs as integers), one row per entry, headers as in the Markdown table."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([key if key in ("params", "macs_per_nfe", "macs_per_sample") else header for key, header in cols])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row.get(key) for key, _ in cols])
    atomic_write_text(path, buffer.getvalue())


def markdown_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(header for _, header in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_format(key, row.get(key)) for key, _ in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- plots
def pareto_front(xs: list[float], ys: list[float]) -> list[bool]:
    """True for each point no other point dominates (x' <= x and y' <= y with one strictly smaller): lower is
    better on both axes. Points with a NaN coordinate are never on the front."""
    points = list(zip(xs, ys))

    def dominated(p: tuple[float, float]) -> bool:
        return any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points if not any(map(math.isnan, q)))

    return [not any(map(math.isnan, p)) and not dominated(p) for p in points]


def plot_front(names: list[str], xs: list[float], ys: list[float], xlabel: str, ylabel: str, title: str) -> Figure:
    """Scatter on log-x with every point numbered, the numbers listed with their names beside the axes, and the
    Pareto front (lower-left) highlighted."""
    front = pareto_front(xs, ys)
    fig = Figure(figsize=(9.5, 4.8), dpi=120)  # no pyplot: PNGs are drawn by the Agg canvas, no global backend
    ax = fig.add_axes((0.08, 0.11, 0.6, 0.8))
    ax.scatter(
        [x for x, f in zip(xs, front) if not f],
        [y for y, f in zip(ys, front) if not f],
        color="tab:gray",
        label="dominated",
        zorder=2,
    )
    order = sorted((x, y) for x, y, f in zip(xs, ys, front) if f)
    ax.step([x for x, _ in order], [y for _, y in order], where="post", color="tab:red", alpha=0.5, zorder=1)
    ax.scatter([x for x, _ in order], [y for _, y in order], color="tab:red", label="Pareto front", zorder=3)
    legend = []
    for i, (name, x, y, f) in enumerate(zip(names, xs, ys, front), start=1):
        if not (math.isnan(x) or math.isnan(y)):
            ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        legend.append(f"{i:>2}  {name}{'  *' if f else ''}")
    fig.text(0.71, 0.91, "\n".join(legend + ["", "* on the Pareto front"]), fontsize=7, family="monospace", va="top")
    ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _save_figure(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp)


# ------------------------------------------------------------------------------------------- evaluation
def evaluate_entry(entry: dict, cfg: dict, model: torch.nn.Module | OnnxGenerator, out: Path) -> dict:
    """Sample the entry, compute every extractor's metrics and the cost measures; one result row. An ONNX
    generator makes the images of the same noise (seed, i); its MACs and peak memory are not measured."""
    m, c = cfg["metrics"], cfg["cost"]
    started = time.time()
    onnx = isinstance(model, OnnxGenerator)
    classes = model.num_classes if onnx else num_classes(model)  # conditional: class-balanced samples
    if onnx:
        images, nfe = model.sample(m["n_samples"], m["seed"], m["batch_size"]), 1
    else:
        images, nfe = sample(
            model,
            m["n_samples"],
            method=entry["method"],
            steps=entry["steps"],
            seed=m["seed"],
            batch_size=m["batch_size"],
            rtol=entry["tol"],
            atol=entry["tol"],
            progress=True,
        )
    images = to_uint8(images)
    if cfg["grid"]:
        save_grid(to_float(images[: cfg["grid"]]), out / "samples" / f"{entry['name']}.png")
    adaptive = entry["method"] == "dopri5"
    row = {
        "name": entry["name"],
        "model": str(entry["model"]),
        "method": entry["method"],
        "solver": f"dopri5 (tol {entry['tol']:g})" if adaptive else entry["method"],
        "steps": None if adaptive else entry["steps"],
        "tol": entry["tol"] if adaptive else None,
        "nfe": nfe,
    }
    if classes:
        row[CLASS_ACCURACY] = None
        if classes == load_domain_net(m["domain_weights"]).config["num_classes"]:
            row[CLASS_ACCURACY] = class_accuracy(
                images,
                balanced_labels(len(images), classes),
                weights=m["domain_weights"],
                device=torch.device("cpu") if onnx else next(model.parameters()).device,
                batch_size=m["batch_size"],
            )
    for extractor in m["extractors"]:
        row.update(
            compute_metrics(
                images,
                cfg["reference"],
                extractor,
                weights=m[f"{extractor}_weights"],
                cache_dir=m["cache_dir"],
                device=torch.device("cpu") if onnx else next(model.parameters()).device,
                batch_size=m["batch_size"],
                kid_subsets=m["kid_subsets"],
                kid_subset_size=m["kid_subset_size"],
                prc_neighborhood=m["prc_neighborhood"],
                seed=m["seed"],
            )
        )
    shape = tuple(images.shape[1:])
    if onnx:
        cost = model.cost(tuple(c["batch_sizes"]), c["warmup"], c["repeats"])
    else:
        cost = measure_cost(
            model,
            shape,
            entry["method"],
            entry["steps"],
            entry["tol"],
            tuple(c["batch_sizes"]),
            c["warmup"],
            c["repeats"],
        )
    cost.pop("nfe")  # the table's NFE is the mean over the benchmark's own samples
    row.update(
        cost,
        macs_per_sample=None if cost["macs_per_nfe"] is None else round(cost["macs_per_nfe"] * nfe),
        n_samples=m["n_samples"],
        seconds=round(time.time() - started, 1),
    )
    return row


def _machine(device: torch.device) -> dict:
    return {
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


HPARAM_KEYS = ("model", "method", "steps", "tol", "n_samples", "device")  # an entry's settings


def hparams_of(row: dict, cols: list[tuple[str, str]]) -> tuple[dict, dict]:
    """(settings, figures) of a result row for TensorBoard's hparams plugin: the entry's settings, and each numeric
    column (NFE, params, MACs, latency, memory, FID, KID, ...) under the slug of its key; absent values are left
    out."""
    settings = {key: row[key] for key in HPARAM_KEYS if row.get(key) is not None}
    figures = {
        _slug(key): float(row[key])
        for key, _ in cols
        if key not in ("steps", *HPARAM_KEYS) and isinstance(row.get(key), (int, float))
    }
    return settings, figures


def _remove_event_files(tb: Path) -> None:
    """Delete the TensorBoard event files of a previous report in `tb` and its per-entry folders."""
    for stale in [*tb.glob("events.out.tfevents.*"), *tb.glob("*/events.out.tfevents.*")]:
        stale.unlink()
    for folder in tb.glob("*"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def write_reports(rows: list[dict], cfg: dict, out: Path, header: str, footer: str = "") -> dict[str, Path]:
    """bench.csv, bench.md (header, table, footer), both PNG figures and TensorBoard: the table as text, the figures,
    and one hparams run per entry (tb/<name>) with its settings and numbers, shown as a table in the HPARAMS tab."""
    cols = columns(cfg)
    if any(CLASS_ACCURACY in row for row in rows):
        cols.append((CLASS_ACCURACY, f"{CLASS_ACCURACY} (%)"))
    paths = {
        "csv": out / "bench.csv",
        "md": out / "bench.md",
        "fid_vs_params": out / "fid_vs_params.png",
        "fid_vs_macs": out / "fid_vs_macs.png",
        "fid_vs_latency": out / "fid_vs_latency.png",
    }
    write_csv(rows, cols, paths["csv"])
    table = markdown_table(rows, cols) + footer
    atomic_write_text(paths["md"], header + "\n" + table)
    fid = metric_label("fid", cfg["metrics"]["extractors"][0])
    names = [r["name"] for r in rows]
    ys = [float(r[fid]) for r in rows]
    batch = min(cfg["cost"]["batch_sizes"])
    figures = {
        "fid_vs_params": plot_front(
            names, [float(r["params"]) for r in rows], ys, "parameters", fid, f"{fid} vs parameters"
        ),
        "fid_vs_macs": plot_front(
            names,
            [math.nan if r["macs_per_sample"] is None else float(r["macs_per_sample"]) for r in rows],
            ys,
            "MACs per sample (all NFE)",
            fid,
            f"{fid} vs MACs",
        ),
        "fid_vs_latency": plot_front(
            names,
            [float(r[f"latency_ms_b{batch}"]) for r in rows],
            ys,
            f"latency (ms/image, batch {batch}, {rows[0]['device']})",
            fid,
            f"{fid} vs latency",
        ),
    }
    _remove_event_files(out / "tb")  # the event files show the current table only
    writer = SummaryWriter(str(out / "tb"))
    for row in rows:  # one hparams run per entry, tb/<name>: the HPARAMS tab's table of settings and figures
        writer.add_hparams(*hparams_of(row, cols), run_name=row["name"])
    for name, fig in figures.items():
        _save_figure(fig, paths[name])
        writer.add_figure(name, fig, 0)  # closes the figure
    writer.add_text("bench", header + "\n" + table, 0)
    writer.close()
    return paths


def report_header(cfg: dict, command: str | None, now: str, machine: dict, extractor_ids: dict[str, str]) -> str:
    """The Markdown header of bench.md: command, machine, reference, samples, extractors and what each cost means."""
    ref = cfg["reference"]
    extractor_names = ", ".join(f"{e} = {name}" for e, name in extractor_ids.items())
    return (
        f"# Benchmark ({now})\n\nCommand: `{command or shlex.join(sys.orig_argv)}`\n\n"
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), device {machine['device']}"
        f"{', ' + machine['gpu'] if machine['gpu'] else ''}\n\n"
        f"Reference: {ref['name']} {ref['split']} ({'all' if ref['n'] is None else ref['n']} images, "
        f"{ref['image_size']}px); {cfg['metrics']['n_samples']} samples per entry, noise seed "
        f"{cfg['metrics']['seed']}. Feature extractors (torch-fidelity names): {extractor_names}. "
        f"MACs: Torch-Pruning count of one network evaluation (module ops; see slimflow.cost). Latency: "
        f"median ms/image of a full generation. Peak memory: extra memory of one generation at the "
        f"largest batch.\n"
    )


def bench(cfg: dict, command: str | None = None) -> dict:
    """Evaluate every entry of `cfg` (see DEFAULTS), skipping entries already computed with the same
    fingerprint, and write the reports. Returns {"rows", "computed", "skipped", "files"}."""
    cfg = full_config(DEFAULTS, copy.deepcopy(cfg))
    entries = check_entries(cfg["entries"])
    prepare = check_prepare(cfg["prepare"])
    unknown = [
        n
        for pair in cfg["compare"]
        for n in (pair.get("baseline"), pair.get("candidate"))
        if n not in {e["name"] for e in entries}
    ]
    if unknown:
        raise ValueError(f"compare names entries that are not in `entries`: {unknown}")
    extractors = cfg["metrics"]["extractors"]
    if not extractors:
        raise ValueError("metrics.extractors is empty; choose one or more of domain, inception")
    # missing weights or data stop the run before any sampling
    extractor_ids = {e: resolve_extractor(e, cfg["metrics"].get(f"{e}_weights"))[0] for e in extractors}
    reference_images(cfg["reference"])  # a missing data set too
    require_writable(cfg["out"])
    run_prepare(prepare, command)
    device = resolve_device(cfg["device"])
    out = Path(cfg["out"])
    (out / "entries").mkdir(parents=True, exist_ok=True)
    keys = [fingerprint(entry, cfg, device, extractor_ids) for entry in entries]  # also checks every model exists
    rows, computed, skipped = [], [], []
    models: dict[str, torch.nn.Module] = {}
    for entry, key in zip(entries, keys):
        path = out / "entries" / f"{entry['name']}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("fingerprint") == key:
                rows.append(cached["result"])
                skipped.append(entry["name"])
                print(f"bench: {entry['name']}: cached result in {path}", file=sys.stderr)
                continue
            print(f"bench: {entry['name']}: settings or model changed since {path}; recomputing", file=sys.stderr)
        model_key = str(entry["model"])
        if model_key not in models:
            # one model in memory at a time; an exported ONNX generator runs on CPU (onnxruntime)
            models = {
                model_key: OnnxGenerator(entry["model"])
                if is_onnx(entry["model"])
                else load_model(entry["model"], device=device)
            }
        print(f"bench: {entry['name']}: {entry['method']} on {entry['model']}", file=sys.stderr)
        where = "cpu (onnxruntime)" if is_onnx(entry["model"]) else str(device)
        result = {**evaluate_entry(entry, cfg, models[model_key], out), "device": where}
        atomic_write_text(path, json.dumps({"fingerprint": key, "result": result}, indent=1) + "\n")
        rows.append(result)
        computed.append(entry["name"])
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = _machine(device)
    header = report_header(cfg, command, now, machine, extractor_ids)
    footer = "\n## Comparisons\n\n" + comparison_table(rows, cfg["compare"], extractors[0]) if cfg["compare"] else ""
    files = write_reports(rows, cfg, out, header, footer)
    atomic_write_text(
        out / "bench.json",
        json.dumps({"date": now, "machine": machine, "config": cfg, "rows": rows}, indent=1, default=str) + "\n",
    )
    return {"rows": rows, "computed": computed, "skipped": skipped, "files": {k: str(v) for k, v in files.items()}}
