"""Benchmark: reflow pair generation with each solver — pairs/s, NFE per pair, and how far the pairs lie from the
teacher's exact ODE solution.

For each solver setting, `slimflow.pairs.generate_pairs` writes a store of N pairs from the committed Fashion-MNIST
teacher (noise of (seed, 0..N-1)); its manifest gives pairs/s and mean NFE/pair. The error is the mean squared
difference per pixel of the stored images (float16, as the presets store them: rounding adds at most ~1e-7) to a
reference solution on the same noise: dopri5 with rtol = atol = 1e-5 (~400 NFE).
Outputs: solvers.json, solvers.csv, solvers.md next to this script.

Run from the repository root (one thread, as the README's numbers):
    OMP_NUM_THREADS=1 python benchmarks/pairs/run_solvers.py [--n 64]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from slimflow.flow import noise_for  # noqa: E402
from slimflow.pairs import PairStore, generate_pairs  # noqa: E402
from slimflow.solvers import solve  # noqa: E402
from teachers.zoo import load_model  # noqa: E402

HERE = Path(__file__).resolve().parent
TEACHER = "teachers/weights/fmnist_teacher.safetensors"
SETTINGS = [
    {"method": "euler", "steps": 8},
    {"method": "euler", "steps": 16},
    {"method": "euler", "steps": 32},
    {"method": "heun", "steps": 8},
    {"method": "midpoint", "steps": 8},
    {"method": "rf_solver", "steps": 8},
    {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3},
    {"method": "dopri5", "rtol": 1e-4, "atol": 1e-4},
]
REFERENCE = {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "max_steps": 10_000}


def label(solver: dict) -> str:
    if solver["method"] == "dopri5":
        return f"dopri5 tol {solver['rtol']:g}"
    return f"{solver['method']} {solver['steps']} steps"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="pairs per solver")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    teacher = load_model(TEACHER)
    shape = [teacher.config["in_channels"], teacher.config["resolution"], teacher.config["resolution"]]
    noise = noise_for(torch.arange(args.n), 0, shape)
    started = time.time()
    with torch.no_grad():
        exact = torch.cat(
            [solve(teacher, noise[i : i + args.batch_size], **REFERENCE).x for i in range(0, args.n, args.batch_size)]
        )
    reference_seconds = time.time() - started
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, solver in enumerate(SETTINGS):
            manifest = generate_pairs(
                teacher,
                Path(tmp) / str(k),
                n=args.n,
                shape=shape,
                seed=0,
                solver=solver,
                shard_size=args.n,
                batch_size=args.batch_size,
                image_format="float16",
            )
            _, images = PairStore(Path(tmp) / str(k)).batch(torch.arange(args.n))
            rows.append(
                {
                    "solver": label(solver),
                    "pairs_per_s": round(manifest["pairs_per_s"], 2),
                    "nfe_per_pair": round(manifest["nfe_per_pair_mean"], 1),
                    "mse_to_exact": float((images - exact).square().mean()),
                }
            )
            print(rows[-1], flush=True)
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = "OMP_NUM_THREADS=1 python benchmarks/pairs/run_solvers.py " + " ".join(sys.argv[1:])
    (HERE / "solvers.json").write_text(
        json.dumps(
            {
                "date": date,
                "command": command.strip(),
                "machine": machine,
                "n": args.n,
                "teacher": TEACHER,
                "reference_seconds": reference_seconds,
                "rows": rows,
            },
            indent=1,
        )
    )
    with open(HERE / "solvers.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Pair generation per solver ({date})",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch "
        f"{machine['torch']} ({machine['torch_threads']} thread)  ",
        f"Teacher: `{TEACHER}`; {args.n} pairs per solver, batch {args.batch_size}. Error: mean squared "
        "difference per pixel (images in [-1, 1]) to dopri5 at tol 1e-5 on the same noise.",
        "",
        "| solver | pairs/s | NFE/pair | MSE to exact |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['solver']} | {r['pairs_per_s']:.2f} | {r['nfe_per_pair']:g} | {r['mse_to_exact']:.2e} |" for r in rows
    ]
    (HERE / "solvers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
