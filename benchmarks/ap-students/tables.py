"""The tables of benchmarks/ap-students/README.md, from the two bench runs (both extractors) and the prune summaries.

    python benchmarks/ap-students/tables.py [--runs runs/ap-students]

Per sparsity and method: FID (domain) and FID (extractor2) as mean ± std over the two seeds (sample std), AP minus
magnitude as mean ± std of the per-seed differences, and from the prune summaries the one-step l2 to the dense
student before and after recovery, the SiLU dead-neuron rate and the sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = ("", "-seed1")
PCTS = (50, 80, 90)


def fids(bench: Path) -> dict[str, float]:
    rows = json.loads(bench.read_text())["rows"]
    return {r["name"]: r["FID (domain)"] for r in rows}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def fid_table(f1: dict, f2: dict) -> str:
    lines = [
        "| sparsity | magnitude, FID (domain) | magnitude + AP | AP − magnitude | magnitude, FID (extractor2) | "
        "magnitude + AP | AP − magnitude |",
        "|---|---|---|---|---|---|---|",
    ]
    dense = [[f[f"dense{s}"] for s in SEEDS] for f in (f1, f2)]
    lines.append(f"| 0% (dense) | {mean_std(dense[0])} | | | {mean_std(dense[1])} | | |")
    for pct in PCTS:
        cells = []
        for f in (f1, f2):
            mag = [f[f"lamp-magnitude{s}-{pct}"] for s in SEEDS]
            ap = [f[f"lamp-ap{s}-{pct}"] for s in SEEDS]
            cells += [mean_std(mag), mean_std(ap), mean_std([a - m for a, m in zip(ap, mag)])]
        lines.append(f"| {pct}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(runs: Path) -> str:
    lines = [
        "| run | model | non-zero params | l2 to dense before recovery | after | DNR (SiLU) | bitmask + values (KB) | "
        "deflated file (KB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in ("lamp-magnitude", "lamp-ap", "lamp-magnitude-seed1", "lamp-ap-seed1", "magnitude", "ap"):
        path = runs / run / "summary.json"
        if not path.is_file():
            continue
        models = json.loads(path.read_text())["models"]
        label = run if run.startswith("lamp") else f"global-{run}"
        d = models["unpruned"]
        lines.append(
            f"| {label} | dense | {d['nonzero_params']:,} | | | {d['dnr']:.4f} | | {d['deflated_bytes'] / 1e3:.0f} |"
        )
        for pct in PCTS:
            m, b = models[f"sparse-{pct}%"], models[f"sparse-{pct}%-before-recovery"]
            lines.append(
                f"| {label} | {pct}% | {m['nonzero_params']:,} | {b['l2_to_unpruned']:.4f} | {m['l2_to_unpruned']:.4f} | "
                f"{m['dnr']:.4f} | {m['sparse_bytes'] / 1e3:.0f} | {m['deflated_bytes'] / 1e3:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/ap-students", help="the prune runs' folder (for the summaries)")
    args = parser.parse_args()
    f1, f2 = fids(HERE / "bench" / "bench.json"), fids(HERE / "bench-extractor2" / "bench.json")
    print(fid_table(f1, f2))
    print()
    print(summary_table(Path(args.runs)))


if __name__ == "__main__":
    main()
