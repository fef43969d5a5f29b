"""One size-quality front over both budgets: FID against MACs per sample of every one-step model the fmnist-pareto
benches measured (m budget, s budget, s variants), under each extractor, with the Pareto front marked.

    .venv/bin/python benchmarks/fmnist-pareto/front.py    # reads the bench.json files, writes fid_vs_macs*.png

Reads only the committed bench results (no model is run). A model evaluated by two benches of the same extractor
(the s variants re-evaluate two seed-0 students) is plotted once. Left out, as they would only stretch the axes:
the teacher's one step (237.6M MACs, FID 24.4) and the pruned models before any training (FID 22-26).
"""

from __future__ import annotations

import json
from pathlib import Path

from slimflow.stages.bench import plot_front

HERE = Path(__file__).resolve().parent
BENCHES = {  # extractor -> bench folders
    "domain": ["m-budget", "m-lpips-huber", "m-direct", "s-budget", "s-variants", "s-direct"],
    "extractor2": [
        "m-budget-extractor2",
        "m-lpips-huber-extractor2",
        "m-direct-extractor2",
        "s-budget-extractor2",
        "s-direct-extractor2",
    ],
}


def left_out(name: str) -> bool:
    return name == "teacher-euler-1" or name.endswith("untrained")


def points(folders: list[str]) -> dict[str, tuple[float, float]]:
    """{entry name: (MACs per sample, FID)} over the benches' rows, first bench first."""
    found: dict[str, tuple[float, float]] = {}
    for folder in folders:
        for row in json.loads((HERE / folder / "bench.json").read_text())["rows"]:
            if not left_out(row["name"]) and row["name"] not in found:
                found[row["name"]] = (float(row["macs_per_sample"]), float(row["FID (domain)"]))
    return found


def main() -> None:
    for extractor, folders in BENCHES.items():
        found = points(folders)
        names = list(found)
        label = "FID (domain)" if extractor == "domain" else "FID (extractor2)"
        fig = plot_front(
            names,
            [found[n][0] for n in names],
            [found[n][1] for n in names],
            "MACs per sample (one step)",
            label,
            f"{label} vs MACs, both budgets",
        )
        path = HERE / ("fid_vs_macs.png" if extractor == "domain" else "fid_vs_macs-extractor2.png")
        fig.savefig(path)
        print(path.relative_to(HERE), len(names), "models")


if __name__ == "__main__":
    main()
