"""Training-loss curves of the direct-distillation runs: the pruned teacher and the student of the same MACs from
scratch, each trained by flow-guided distillation alone with the teacher as the two-step guide, on the same batches
(s budget: Taylor importance, seeds 0 and 1; m budget: l2 importance, seed 0). Whether the pruned teacher's weights
give a head start, and whether it lasts, is read off these curves.

    .venv/bin/python benchmarks/fmnist-pareto/direct_losses.py             # from the runs' TensorBoard events
    .venv/bin/python benchmarks/fmnist-pareto/direct_losses.py --committed # re-plot direct_losses.json only

Writes direct_losses.json (every logged window mean of train/loss, train/distill and train/two_step; the runs'
folders do not survive a session, this file does) and direct_losses.png (a row per budget).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = {  # curve name -> the run folder holding tb/
    "pruned teacher (taylor), seed 0": "runs/pareto/s-pruned-teacher-taylor-direct-seed0/recover",
    "pruned teacher (taylor), seed 1": "runs/pareto/s-pruned-teacher-taylor-direct-seed1/recover",
    "student-s from scratch, seed 0": "runs/pareto/s-scratch-direct-seed0",
    "student-s from scratch, seed 1": "runs/pareto/s-scratch-direct-seed1",
    "m: pruned teacher (l2), seed 0": "runs/pareto/m-pruned-teacher-direct-seed0/recover",
    "m: student-m from scratch, seed 0": "runs/pareto/m-scratch-direct-seed0",
}
SCALARS = ("train/loss", "train/distill", "train/two_step")


def read_curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """{scalar: [[step, value], ...]} of one run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    return {name: [[e.step, e.value] for e in events.Scalars(name)] for name in SCALARS}


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"s": {k: v for k, v in curves.items() if not k.startswith("m: ")}}
    rows["m"] = {k.removeprefix("m: "): v for k, v in curves.items() if k.startswith("m: ")}
    rows = {budget: runs for budget, runs in rows.items() if runs}
    fig, axes = plt.subplots(
        len(rows), len(SCALARS), figsize=(5 * len(SCALARS), 4 * len(rows)), constrained_layout=True, squeeze=False
    )
    for row, (budget, runs) in zip(axes, rows.items(), strict=True):
        for ax, scalar in zip(row, SCALARS, strict=True):
            for name, run in runs.items():
                steps, values = zip(*run[scalar], strict=True)
                ax.plot(steps, values, "-" if name.startswith("pruned") else "--", label=name)
            ax.set_yscale("log")
            ax.set_xlabel("step (32 images each)")
            ax.set_title(f"{scalar}, {budget} budget")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--committed", action="store_true", help="re-plot the committed direct_losses.json")
    args = parser.parse_args()
    data_file = HERE / "direct_losses.json"
    if args.committed:
        curves = json.loads(data_file.read_text())
    else:
        curves = {name: read_curves(ROOT / folder) for name, folder in RUNS.items()}
        data_file.write_text(json.dumps(curves) + "\n")
    plot(curves, HERE / "direct_losses.png")
    for name, run in curves.items():
        loss = dict((int(s), v) for s, v in run["train/loss"])
        marks = [s for s in (100, 500, 1000, 2000) if s in loss]
        print(f"{name}: " + ", ".join(f"step {s} {loss[s]:.4f}" for s in marks))


if __name__ == "__main__":
    main()
