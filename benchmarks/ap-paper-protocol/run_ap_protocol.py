"""Benchmark: AP on the paper's own protocol — lottery-ticket iterative magnitude pruning with weight rewinding.

Issue 11, item 3. The earlier replication (benchmarks/pruning/ap_fmnist.md) fine-tuned briefly between cycles; the
AP paper (Liu et al., TMLR 2023) rewinds and retrains fully every cycle. Here (CPU, one thread, sizes are arguments):

- networks: a VGG-style CNN with batch norm and ReLU (benchmarks/pruning/run_ap.py's `vgg_small`, widths
  w·(1, 2, 2, 4, 4)) and a ResNet-style CNN (a stem and three stages of one basic residual block with batch norm,
  widths w·(1, 2, 4)), both on Fashion-MNIST 28×28, trained on a fixed subset of the training images;
- per (network, seed): dense training from a seeded initialisation (SGD momentum 0.9, weight decay 5e-4, cosine
  learning rate over `--steps`), keeping the weights at an early iterate (the rewinding point);
- per method (magnitude; magnitude + AP), from that same dense model: `--cycles` cycles of: remove `--rate` of the
  surviving Conv/Linear weights, ranked globally by magnitude, except that a share `--ap-fraction` of them is
  chosen by the AP rule instead (surviving negative weights whose |w_end − w_start| over the last training was
  smallest); rewind the survivors to the rewinding point; retrain with the dense schedule and the masks enforced;
  then test accuracy and the ReLU dead-neuron rate (during the retraining in train mode, and on the test set).

Resumable: everything lives in a work folder (default runs/ap-paper-protocol/). The dense model and rewinding point
of each (network, seed) and a checkpoint of each (network, seed, method) run after every cycle are written there,
so a restart skips finished work and continues unfinished runs at the next cycle. `--only network=vgg,seed=0`
(repeatable) selects runs, so several processes can share the work. At the end (or with `--report-only`) the
results
of all runs found in the work folder, finished or not, are written to results.json, results.csv and README.md.

Run from the repository root:  OMP_NUM_THREADS=1 python benchmarks/ap-paper-protocol/run_ap_protocol.py
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from pruning import (  # noqa: E402
    DeadNeuronMonitor,
    WeightMasks,
    classification_loss,
    fine_tune,
    image_batches,
    iterative_pruning,
    rewind,
    snapshot,
)
from slimflow.data import load_images  # noqa: E402

HERE = Path(__file__).resolve().parent
NETWORKS = ("vgg", "resnet")
METHODS = ("magnitude", "ap")
REPORTED = (0.5, 0.8, 0.9, 0.95, 0.98)  # sparsities the README tables show (the nearest cycle)
SUBSET_SEED = 12345  # the training subset is the same for every network and seed
# the settings that must match between the work folder and a restart; the others select work or outputs
# (`--cycles` may grow on a restart: earlier cycles do not depend on it)
SIZE_KEYS = (
    "width",
    "rate",
    "ap_fraction",
    "train_images",
    "steps",
    "batch_size",
    "lr",
    "rewind_fraction",
    "test_images",
)


def load_ap_fmnist():
    """The earlier AP benchmark (benchmarks/pruning/run_ap.py) as a module: its VGG-style network, test metrics
    and CPU name are reused so that both benchmarks measure the same things the same way."""
    spec = importlib.util.spec_from_file_location("ap_fmnist_run", ROOT / "benchmarks" / "pruning" / "run_ap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AP_FMNIST = load_ap_fmnist()


# ---------------------------------------------------------------------------------------------- networks
class BasicBlock(nn.Module):
    """ResNet basic block (conv-BN-ReLU, conv-BN, + shortcut, ReLU). Each ReLU is its own module so the
    dead-neuron monitor sees both; the shortcut is a 1×1 conv + BN when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_small(width: int, classes: int = 10) -> nn.Sequential:
    """A ResNet-8-style CNN for 28×28 grey images: stem conv-BN-ReLU, stages of one basic block at widths
    w, 2w, 4w (strides 1, 2, 2), global average pooling, linear head."""
    widths = (width, 2 * width, 4 * width)
    stem = [nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    blocks = [BasicBlock(cin, cout, stride) for cin, cout, stride in zip((width, *widths[:-1]), widths, (1, 2, 2))]
    return nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes))


def build_network(name: str, width: int) -> nn.Module:
    if name == "vgg":
        return AP_FMNIST.vgg_small(widths=tuple(width * m for m in (1, 2, 2, 4, 4)))
    if name == "resnet":
        return resnet_small(width)
    raise ValueError(f"unknown network {name!r}: use one of {', '.join(NETWORKS)}")


# ---------------------------------------------------------------------------------------------- data, training
def load_data(cfg: dict) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train subset, test set) as uint8 images and labels. The subset is a fixed random draw, the same for every
    network and seed, so that the task is harder than full Fashion-MNIST and each training is cheap."""
    train = load_images("fashion_mnist", split="train", image_size=28)
    test = load_images("fashion_mnist", split="test", image_size=28)
    pick = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(SUBSET_SEED))
    pick = pick[: cfg["train_images"]]
    return (train.images[pick], train.labels[pick]), (
        test.images[: cfg["test_images"]],
        test.labels[: cfg["test_images"]],
    )


def training_batches(train, cfg: dict, seed: int, cycle: int):
    """Endless shuffled batches; the order depends on (seed, cycle) only, so both methods see the same images in
    the same order and a resumed run reproduces the one it replaces."""
    gen = torch.Generator().manual_seed(1000 * seed + cycle)
    return image_batches(*train, cfg["batch_size"], repeat=True, generator=gen)


def train(model: nn.Module, batches, cfg: dict, masks: WeightMasks | None = None, on_step=None) -> float:
    """One full training (the dense schedule: `steps` SGD steps, momentum 0.9, weight decay 5e-4, cosine lr),
    with `masks` enforced; returns the dead-neuron rate over all ReLU outputs seen during it (train mode)."""
    with DeadNeuronMonitor(model) as monitor:
        fine_tune(
            model,
            classification_loss,
            batches,
            steps=cfg["steps"],
            lr=cfg["lr"],
            optimizer="sgd",
            momentum=0.9,
            weight_decay=5e-4,
            masks=masks,
            on_step=on_step,
        )
        return monitor.rates()["overall"]


def rewind_step(cfg: dict) -> int:
    """The training step whose weights are the rewinding point (at least 1: an early iterate, not the init)."""
    return max(1, round(cfg["rewind_fraction"] * cfg["steps"]))


class Clock:
    """Wall and CPU seconds since creation (CPU time of this process: with one thread it excludes the time the
    shared cores spend on other jobs)."""

    def __init__(self):
        self.wall, self.cpu = time.time(), time.process_time()

    def elapsed(self) -> dict:
        return {"wall_seconds": time.time() - self.wall, "cpu_seconds": time.process_time() - self.cpu}


# ---------------------------------------------------------------------------------------------- work folder
def save_atomically(obj, path: Path) -> None:
    """torch.save or JSON-dump through a temporary file and a rename, so an interrupted write never leaves a
    half-written file for the next restart to trust."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def dense_path(work: Path, network: str, seed: int) -> Path:
    return work / f"dense-{network}-seed{seed}.pt"


def run_paths(work: Path, network: str, seed: int, method: str) -> tuple[Path, Path]:
    """(checkpoint after the last finished cycle, results so far) of one run."""
    stem = f"{network}-seed{seed}-{method}"
    return work / f"{stem}.pt", work / f"{stem}.json"


def check_config(work: Path, cfg: dict) -> None:
    """Write the sizes to work/config.json on first use; refuse to mix results of other sizes into it later."""
    path = work / "config.json"
    sizes = {k: cfg[k] for k in SIZE_KEYS}
    if path.exists():
        stored = json.loads(path.read_text())
        changed = {k: (stored.get(k), v) for k, v in sizes.items() if stored.get(k) != v}
        if changed:
            raise SystemExit(
                f"{work} holds results of other sizes ({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in changed.items())}); "
                "use the same arguments or another --work folder"
            )
    else:
        save_atomically(sizes, path)


def dense_model(network: str, seed: int, cfg: dict, train_set, test, work: Path) -> dict:
    """The dense model of (network, seed): loaded from the work folder, else trained and saved.
    Returns {"init", "rewind", "trained"} state dicts and "record" (accuracy, DNRs, time)."""
    path = dense_path(work, network, seed)
    if path.exists():
        return torch.load(path, weights_only=True)
    clock = Clock()
    torch.manual_seed(seed)
    model = build_network(network, cfg["width"])
    init, rewind_point, at = snapshot(model), {}, rewind_step(cfg)

    def keep_rewind_point(m, step, _loss):
        if step + 1 == at:
            rewind_point.update(snapshot(m))

    dnr_train = train(model, training_batches(train_set, cfg, seed, 0), cfg, on_step=keep_rewind_point)
    accuracy, dnr_test = AP_FMNIST.test_metrics(model, test)
    record = {
        "network": network,
        "seed": seed,
        "cycle": 0,
        "sparsity": 0.0,
        "accuracy": accuracy,
        "dnr_train": dnr_train,
        "dnr_test": dnr_test,
        **clock.elapsed(),
    }
    dense = {"init": init, "rewind": rewind_point, "trained": snapshot(model), "record": record}
    save_atomically(dense, path)
    print(f"{network} seed {seed} dense: acc {accuracy:.4f} dnr {dnr_train:.3f} ({record['cpu_seconds']:.0f} s CPU)")
    return dense


def start_weights_of(network: str, cfg: dict, dense: dict, masks: WeightMasks, cycle: int) -> dict:
    """The weights at the start of the last training, AP's reference point: the dense initialisation before
    cycle 1; afterwards the rewinding point with the masks applied (what every retraining starts from)."""
    if cycle == 0:
        return dense["init"]
    model = build_network(network, cfg["width"])
    rewind(model, dense["rewind"], masks)
    return snapshot(model)


def pruning_run(network: str, seed: int, method: str, cfg: dict, train_set, test, work: Path, dense: dict) -> None:
    """Run (or continue) the IMP-with-rewinding cycles of one method; after every cycle the checkpoint and the
    results so far are written to the work folder."""
    ckpt_path, json_path = run_paths(work, network, seed, method)
    model = build_network(network, cfg["width"])
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        masks, records = WeightMasks(state["masks"]), state["records"]
    else:
        model.load_state_dict(dense["trained"])
        masks = WeightMasks.dense(model)
        records = [{**dense["record"], "method": method}]
    done = records[-1]["cycle"]
    if done >= cfg["cycles"]:
        save_atomically({"records": records}, json_path)
        return
    print(f"{network} seed {seed} {method}: from cycle {done + 1} of {cfg['cycles']}", flush=True)
    cycle = {"index": done, "clock": None, "dnr_train": None}

    def retrain(m, cycle_masks):
        cycle["index"] += 1
        batches = training_batches(train_set, cfg, seed, cycle["index"])
        cycle["dnr_train"] = train(m, batches, cfg, masks=cycle_masks)

    def after_cycle(m, cycle_masks, _target):
        accuracy, dnr_test = AP_FMNIST.test_metrics(m, test)
        record = {
            "network": network,
            "seed": seed,
            "method": method,
            "cycle": cycle["index"],
            "sparsity": cycle_masks.sparsity(),
            "accuracy": accuracy,
            "dnr_train": cycle["dnr_train"],
            "dnr_test": dnr_test,
            **cycle["clock"].elapsed(),
        }
        records.append(record)
        save_atomically({"model": snapshot(m), "masks": cycle_masks.masks, "records": records}, ckpt_path)
        save_atomically({"records": records}, json_path)
        print(
            f"  {network} seed {seed} {method:9s} cycle {cycle['index']:2d} sparsity {record['sparsity']:.4f} "
            f"acc {accuracy:.4f} dnr train {record['dnr_train']:.3f} test {dnr_test:.3f} "
            f"({record['cpu_seconds']:.0f} s CPU)",
            flush=True,
        )
        cycle["clock"] = Clock()

    targets = [1.0 - (1.0 - cfg["rate"]) ** c for c in range(done + 1, cfg["cycles"] + 1)]
    cycle["clock"] = Clock()
    iterative_pruning(
        model,
        targets,
        retrain,
        start_weights=start_weights_of(network, cfg, dense, masks, done),
        ap_fraction=cfg["ap_fraction"] if method == "ap" else 0.0,
        scope="global",
        masks=masks,
        rewind_to=dense["rewind"],
        after_cycle=after_cycle,
    )


# ---------------------------------------------------------------------------------------------- selection
def parse_only(specs: list[str]) -> list[dict]:
    """`--only network=vgg,seed=0` → [{"network": "vgg", "seed": "0"}]; several --only are alternatives."""
    parsed = []
    for spec in specs:
        terms = dict(term.split("=", 1) for term in spec.split(",") if "=" in term)
        unknown = set(terms) - {"network", "seed", "method"}
        if unknown or not terms or spec.count("=") != len(terms):
            raise SystemExit(f"--only {spec!r}: use key=value pairs separated by commas; keys network, seed, method")
        parsed.append(terms)
    return parsed


def selected(only: list[dict], network: str, seed: int, method: str | None = None) -> bool:
    """Whether a run (or, with method None, any method of a (network, seed)) is selected by --only."""
    if not only:
        return True
    values = {"network": network, "seed": str(seed), "method": method}

    def matches(key: str, wanted: str) -> bool:
        return values[key] is None or values[key] == wanted  # no method given: any method counts

    return any(all(matches(k, v) for k, v in terms.items()) for terms in only)


def all_runs(cfg: dict) -> list[tuple[str, int, str]]:
    return [(n, s, m) for n in cfg["networks"] for s in range(cfg["seeds"]) for m in METHODS]


# ---------------------------------------------------------------------------------------------- outputs
def collect(work: Path, cfg: dict) -> tuple[list[dict], dict]:
    """All records found in the work folder, and each run's status: complete, partial (cycles done) or missing."""
    records, status = [], {}
    for network, seed, method in all_runs(cfg):
        json_path = run_paths(work, network, seed, method)[1]
        key = f"{network}-seed{seed}-{method}"
        if not json_path.exists():
            status[key] = "missing"
            continue
        run = json.loads(json_path.read_text())["records"]
        records += [r for r in run if r["cycle"] <= cfg["cycles"]]
        done = run[-1]["cycle"]
        status[key] = "complete" if done >= cfg["cycles"] else f"partial ({done} of {cfg['cycles']} cycles)"
    return records, status


def sessions(work: Path) -> list[dict]:
    """The processes that worked in this folder (command, selection, start, last update, wall and CPU time)."""
    return [json.loads(p.read_text()) for p in sorted((work / "sessions").glob("*.json"))]


class Session:
    """This process's entry in work/sessions/: rewritten after every finished run, so the README can give each
    process's command and times even when it was stopped before the end."""

    def __init__(self, work: Path, command: str, only: list[str]):
        (work / "sessions").mkdir(exist_ok=True)
        self.clock, self.start = Clock(), now()
        self.path = work / "sessions" / f"{self.start.replace(' ', '_').replace(':', '')}-{os.getpid()}.json"
        self.info = {"command": command, "only": ";".join(only), "start": self.start}
        self.update()

    def update(self) -> None:
        save_atomically({**self.info, "end": now(), **self.clock.elapsed()}, self.path)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """ "mean ± std" (sample std), or the single value with "(1 seed)", or "–" when there is none."""
    if not values:
        return "–"
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def by_seed(records: list[dict], network: str, method: str, cycle: int, key: str) -> dict[int, float]:
    return {
        r["seed"]: r[key] for r in records if r["network"] == network and r["method"] == method and r["cycle"] == cycle
    }


def reported_cycles(cfg: dict) -> list[int]:
    """For each sparsity in REPORTED, the cycle whose nominal sparsity 1 − (1 − rate)^c is nearest (if within
    the cycles run)."""
    nominal = {c: 1.0 - (1.0 - cfg["rate"]) ** c for c in range(1, cfg["cycles"] + 1)}
    cycles = [min(nominal, key=lambda c: abs(nominal[c] - s)) for s in REPORTED]
    return sorted(set(cycles))


def network_rows(records: list[dict], network: str, cfg: dict) -> list[dict]:
    """One summary row per reported cycle (and the dense model): accuracies, per-seed AP − magnitude, DNRs."""
    rows = []
    for cycle in [0, *reported_cycles(cfg)]:
        acc = {m: by_seed(records, network, m, cycle, "accuracy") for m in METHODS}
        paired = sorted(set(acc["magnitude"]) & set(acc["ap"]))
        sparsity = [r["sparsity"] for r in records if r["network"] == network and r["cycle"] == cycle]
        rows.append(
            {
                "cycle": cycle,
                "sparsity": statistics.mean(sparsity) if sparsity else 1.0 - (1.0 - cfg["rate"]) ** cycle,
                "accuracy": {m: list(acc[m].values()) for m in METHODS},
                "ap_minus_magnitude": [acc["ap"][s] - acc["magnitude"][s] for s in paired],
                "dnr_train": {m: list(by_seed(records, network, m, cycle, "dnr_train").values()) for m in METHODS},
                "dnr_test": {m: list(by_seed(records, network, m, cycle, "dnr_test").values()) for m in METHODS},
            }
        )
    return rows


def network_table(rows: list[dict]) -> list[str]:
    lines = [
        "| sparsity (cycle) | magnitude acc | AP acc | AP − magnitude | DNR train magnitude | DNR train AP "
        "| DNR test magnitude | DNR test AP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        label = "dense" if row["cycle"] == 0 else f"{row['sparsity']:.1%} ({row['cycle']})"
        cells = [mean_std(row["accuracy"][m], 100) for m in METHODS] + [mean_std(row["ap_minus_magnitude"], 100)]
        cells += [mean_std(row[k][m], digits=3) for k in ("dnr_train", "dnr_test") for m in METHODS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def outcome(rows_by_network: dict[str, list[dict]]) -> str:
    """The outcome sentence per network: mean AP gain over the pruned rows, where it exceeds its spread, and the
    DNR change with AP (the paper: +3–4 points of accuracy and a lower DNR)."""
    parts = []
    for network, rows in rows_by_network.items():
        pruned = [r for r in rows if r["cycle"] > 0 and r["ap_minus_magnitude"]]
        if not pruned:
            parts.append(f"{network}: no paired results yet.")
            continue
        gains = [g for r in pruned for g in r["ap_minus_magnitude"]]
        clear = [
            f"{r['sparsity']:.1%} ({100 * statistics.mean(r['ap_minus_magnitude']):+.2f})"
            for r in pruned
            if len(r["ap_minus_magnitude"]) > 1
            and abs(statistics.mean(r["ap_minus_magnitude"])) > statistics.stdev(r["ap_minus_magnitude"])
        ]
        dnr = [
            f"{r['sparsity']:.1%} {statistics.mean(r['dnr_train']['ap']) - statistics.mean(r['dnr_train']['magnitude']):+.3f}"
            for r in pruned
            if r["dnr_train"]["ap"] and r["dnr_train"]["magnitude"]
        ]
        parts.append(
            f"{network}: over the {len(pruned)} reported sparsities, AP − magnitude averages "
            f"{100 * statistics.mean(gains):+.2f} points (best row {100 * max(statistics.mean(r['ap_minus_magnitude']) for r in pruned):+.2f}); "
            f"the per-seed difference exceeds its std at {', '.join(clear) if clear else 'none of them'}. "
            f"DNR during retraining, AP minus magnitude: {', '.join(dnr)}."
        )
    return " ".join(parts)


def write_outputs(out: Path, work: Path, cfg: dict) -> None:
    """results.json, results.csv and README.md from whatever the work folder holds (finished or not)."""
    out.mkdir(parents=True, exist_ok=True)
    records, status = collect(work, cfg)
    runs_log = sessions(work)
    rows = {n: network_rows(records, n, cfg) for n in cfg["networks"]}
    dense_cpu = [
        torch.load(dense_path(work, n, s), weights_only=True)["record"]["cpu_seconds"]
        for n in cfg["networks"]
        for s in range(cfg["seeds"])
        if dense_path(work, n, s).exists()
    ]
    cycle_cpu = sum(r["cpu_seconds"] for r in records if r["cycle"] > 0)
    params = {n: sum(p.numel() for p in build_network(n, cfg["width"]).parameters()) for n in cfg["networks"]}
    prunable = {n: WeightMasks.dense(build_network(n, cfg["width"])).total() for n in cfg["networks"]}
    save_atomically({"config": cfg, "status": status, "sessions": runs_log, "records": records}, out / "results.json")
    fields = ["network", "seed", "method", "cycle", "sparsity", "accuracy", "dnr_train", "dnr_test"]
    fields += ["cpu_seconds", "wall_seconds"]
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(records, key=lambda r: (r["network"], r["seed"], r["method"], r["cycle"])))

    missing = {k: v for k, v in status.items() if v != "complete"}
    first = min((s["start"] for s in runs_log), default=None)
    last = max((s.get("end", s["start"]) for s in runs_log), default=None)
    lines = [
        "# AP on the paper's protocol: IMP with weight rewinding, VGG- and ResNet-style CNNs (Fashion-MNIST, CPU)",
        "",
        *[f"- command: `{c}`" for c in dict.fromkeys(s["command"] for s in runs_log)],
        f"- dates: {first or '–'} → {last or '–'} (first start → last end of the processes that wrote the work folder)",
        f"- machine: {platform.machine()}, {AP_FMNIST.cpu_name()}, torch {torch.__version__}, 1 thread per process "
        "(2 cores shared with other jobs, run at nice 19)",
        f"- CPU time: {sum(dense_cpu) / 60:.1f} min dense trainings + {cycle_cpu / 60:.1f} min pruning cycles = "
        f"{(sum(dense_cpu) + cycle_cpu) / 60:.1f} CPU-min (process CPU time, one thread); per process, wall / CPU "
        "time at its last update (after each finished run): "
        + ", ".join(
            f"{s['wall_seconds'] / 60:.1f} / {s['cpu_seconds'] / 60:.1f} min (`{s['only'] or 'all'}`, {s['end']})"
            for s in runs_log
        ),
        "- CPU time of one retraining + test evaluation (mean over the cycles run): "
        + ", ".join(f"{n} {mean_cycle_cpu(records, n)}" for n in cfg["networks"]),
        "- status: "
        + (
            "all runs complete"
            if not missing
            else f"{len(status) - len(missing)} of {len(status)} runs complete; not complete: "
            + ", ".join(f"{k} {v}" for k, v in missing.items())
        ),
        "",
        "## Protocol",
        "",
        *protocol_lines(cfg, params, prunable),
        "",
    ]
    for network in cfg["networks"]:
        lines += [f"## {network}", "", *network_table(rows[network]), ""]
    lines += [
        "Accuracy on the test images in %; AP − magnitude is the mean ± std of the per-seed differences (both "
        "methods start from the same dense model and rewinding point and see the same image order). DNR train: "
        "share of ReLU outputs that are exactly 0 during that cycle's retraining (train mode); DNR test: on the "
        "test images (eval mode). Every cycle is in results.csv.",
        "",
        "## Outcome",
        "",
        outcome(rows) + " The paper reports +3–4 points on CIFAR-10/100 ResNet/VGG and a lower DNR with AP.",
        "",
    ]
    notes = HERE / "notes.md"
    if notes.exists() and out.resolve() == HERE:
        lines += [notes.read_text().strip(), ""]
    save_text(out / "README.md", "\n".join(lines))


def mean_cycle_cpu(records: list[dict], network: str) -> str:
    seconds = [r["cpu_seconds"] for r in records if r["network"] == network and r["cycle"] > 0]
    return f"{statistics.mean(seconds):.1f} s ({len(seconds)} cycles)" if seconds else "– (no cycle yet)"


def protocol_lines(cfg: dict, params: dict, prunable: dict) -> list[str]:
    epochs = cfg["steps"] * cfg["batch_size"] / cfg["train_images"]
    final = 1.0 - (1.0 - cfg["rate"]) ** cfg["cycles"]
    return [
        f"- Networks (ReLU, batch norm, all Conv/Linear weights prunable): VGG-style `vgg` = conv-BN-ReLU ×5 at "
        f"widths {[cfg['width'] * m for m in (1, 2, 2, 4, 4)]}, max-pool after conv 1 and 3, global average pool, "
        f"linear head; ResNet-style `resnet` = stem conv-BN-ReLU ({cfg['width']}) + one basic residual block per "
        f"stage at widths {[cfg['width'] * m for m in (1, 2, 4)]} (strides 1, 2, 2; 1×1 conv shortcuts), global "
        "average pool, linear head. Parameters / prunable weights: "
        + ", ".join(f"{n} {params[n]:,} / {prunable[n]:,}" for n in params)
        + ".",
        f"- Data: Fashion-MNIST 28×28, a fixed random subset of {cfg['train_images']:,} training images (the same "
        f"for all runs; smaller than the full 60,000 to make the task harder and each training cheap), no "
        f"augmentation; accuracy on the first {cfg['test_images']:,} test images.",
        f"- Training (dense, and every retraining alike): {cfg['steps']} SGD steps of batch {cfg['batch_size']} "
        f"({epochs:.1f} epochs of the subset), lr {cfg['lr']} cosine to 0, momentum 0.9, weight decay 5e-4. "
        f"Rewinding point: the weights (and batch-norm statistics) after step {rewind_step(cfg)} of the dense "
        f"training ({cfg['rewind_fraction']:.0%}).",
        f"- Cycles: {cfg['cycles']} of: remove {cfg['rate']:.0%} of the surviving Conv/Linear weights, ranked globally "
        f"(to {final:.1%} sparsity after the last); for AP, {cfg['ap_fraction']:.0%} of each cycle's removals "
        f"({cfg['rate'] * cfg['ap_fraction']:.0%} of the surviving weights) are chosen by the AP rule after the "
        f"magnitude share: among the surviving negative weights, those whose |w_end − w_start| over the last "
        f"training was smallest (the dense training for cycle 1, then the previous retraining: from the rewound "
        f"weights to its end). Then the survivors are rewound to the rewinding point and retrained with the "
        f"masks enforced (pruned weights and their gradients held at 0). {cfg['seeds']} seeds per network "
        "(seeded initialisation and image order).",
        "- Reading of the reference code (github.com/Martin1937/AP-Activate-While-Pruning-, resnet_20.py): each "
        "cycle prunes the 18th magnitude percentile of the surviving weights, then 2 % of the surviving weights "
        "(counted before the magnitude step) by AP, i.e. 20 % per cycle of which 2 points by AP: ap_fraction 0.1 "
        "here. There the change is taken between the start and the end of the cycle's training, as here. "
        "Differences: it also prunes batch-norm weights (every parameter named 'weight'); it rewinds to the "
        "initialisation (here: to an early iterate, lottery-ticket rewinding), with a warm-up then step schedule "
        "over 50 epochs of CIFAR-10 with augmentation.",
        f"- What was cut to fit the CPU budget: Fashion-MNIST subset instead of CIFAR-10/100 (no augmentation); "
        f"small networks (ResNet-8-style instead of ResNet-20, 5-conv VGG instead of VGG-16/19); "
        f"{epochs:.1f} epochs of {cfg['train_images']:,} images per training instead of full CIFAR schedules.",
    ]


def save_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default="vgg,resnet", help="comma-separated: vgg, resnet")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. seeds-1")
    parser.add_argument("--width", type=int, default=8, help="base width w of both networks")
    parser.add_argument("--cycles", type=int, default=18, help="pruning cycles (18 of 20 %% → 98.2 %% sparsity)")
    parser.add_argument("--rate", type=float, default=0.2, help="share of surviving weights removed per cycle")
    parser.add_argument("--ap-fraction", type=float, default=0.1, help="AP's share of each cycle's removals")
    parser.add_argument("--train-images", type=int, default=4000, help="size of the fixed training subset")
    parser.add_argument("--steps", type=int, default=700, help="SGD steps of every training (dense and retraining)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--rewind-fraction", type=float, default=0.05, help="rewinding point: share of the steps")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--only", action="append", default=[], help="e.g. network=vgg,seed=0 (repeatable)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "ap-paper-protocol"), help="resumable work folder")
    parser.add_argument("--out", default=str(HERE), help="folder for results.json, results.csv, README.md")
    parser.add_argument("--report-only", action="store_true", help="only write the outputs from the work folder")
    args = parser.parse_args(argv)
    networks = [n for n in args.networks.split(",") if n]
    if not networks or set(networks) - set(NETWORKS):
        parser.error(f"--networks: choose from {', '.join(NETWORKS)}")
    if not 0.0 < args.rate < 1.0 or not 0.0 <= args.ap_fraction <= 1.0 or not 0.0 < args.rewind_fraction < 1.0:
        parser.error("need 0 < rate < 1, 0 <= ap-fraction <= 1 and 0 < rewind-fraction < 1")
    args.networks = networks
    return args


def config_of(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("networks", "seeds", "cycles", *SIZE_KEYS)}


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg, only = config_of(args), parse_only(args.only)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    check_config(work, cfg)
    if not args.report_only:
        torch.set_num_threads(1)
        command = "python " + " ".join([str(Path(sys.argv[0]))] + (sys.argv[1:] if argv is None else argv))
        session = Session(work, command, args.only)
        train_set, test = load_data(cfg)
        for network in cfg["networks"]:
            for seed in range(cfg["seeds"]):
                if not selected(only, network, seed):
                    continue
                dense = dense_model(network, seed, cfg, train_set, test, work)
                for method in METHODS:
                    if selected(only, network, seed, method):
                        pruning_run(network, seed, method, cfg, train_set, test, work, dense)
                        session.update()
    write_outputs(out, work, cfg)


if __name__ == "__main__":
    main()
