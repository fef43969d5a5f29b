"""Edge benchmark on the trained students (issue 16): int8 with a FID-budget mixed plan, and the latency of every
variant measured next to the teacher at its best NFE, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edge/run_trained.py [--threads 1 2] [--skip-fid]

1. Exports each trained one-step student (`slimflow.stages.export.export_model`) into runs/edge-trained/<name>/:
   fp32 ONNX, int8 (7-bit weights, 64 calibration samples), and the mixed file whose FID (domain, 1,000 samples)
   stays within +5 % of the fp32 file's (`int8_fid_budget=0.05`). export.json copies go to trained/.
2. Latency, at each thread count, batch 1 and 64: the teacher at 32 Euler steps in PyTorch (its best FID in
   benchmarks/fmnist-cpu: 2.55) and its one-step ONNX file, and every student variant (fp32 torch, fp32 ONNX
   Runtime, int8 naive, int8 mixed); three interleaved rounds, the median of each, so that load from other
   processes on the shared cores hits every variant alike.
3. FID (domain) and FID under benchmarks/fmnist-cpu/extractor2/ of every student file (2,000 samples), by
   `slimflow bench`'s code: an ONNX entry runs in onnxruntime on the same noise as the torch entry.

Writes benchmarks/edge/trained/{results.json, latency.md, export-<name>.json} and the bench reports
trained/bench/, trained/bench-extractor2/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pruning.measure import median_ms
from slimflow.config import load_config
from slimflow.sample import sample
from slimflow.stages.bench import DEFAULTS, bench
from slimflow.stages.export import OneStepGenerator, export_model
from teachers.zoo import load_model

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benchmarks" / "edge" / "trained"
WORK = ROOT / "runs" / "edge-trained"
TEACHER = ROOT / "teachers" / "weights" / "fmnist_teacher.safetensors"
TEACHER_BEST_NFE = 32
EXTRACTOR2 = ROOT / "benchmarks" / "fmnist-cpu" / "extractor2" / "domain_net_small.safetensors"
MODELS = ROOT / "benchmarks" / "fmnist-pareto" / "models"
STUDENTS = {
    "student-s": MODELS / "s-scratch-distilled.safetensors",
    "student-m": MODELS / "m-scratch-distilled.safetensors",
    "student-m-pruned-teacher": MODELS / "m-pruned-teacher-distilled.safetensors",
}
FID_BUDGET = 0.05
ROUNDS, REPEATS_B1, REPEATS_B64 = 3, 50, 6
VARIANTS = {
    "fp32 ORT": "generator.onnx",
    "int8 ORT (naive)": "generator.int8.onnx",
    "int8 ORT (mixed)": "generator.int8-mixed.onnx",
}


def export(name: str, path: Path) -> dict:
    out = WORK / name
    if (out / "export.json").is_file() and json.loads((out / "export.json").read_text()).get("int8_mixed"):
        return json.loads((out / "export.json").read_text())  # exports are deterministic: resume by reuse
    started = time.time()
    report = export_model(path, out, formats=("onnx",), int8=True, int8_fid_budget=FID_BUDGET, warmup=2, repeats=20)
    report["seconds"] = round(time.time() - started, 1)
    (out / "export.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.copy(out / "export.json", HERE / f"export-{name}.json")
    return report


def runners(threads: int) -> dict:
    """{(model, variant): run(z as numpy)} for every file, at `threads` threads."""
    import onnxruntime as ort

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    out = {}
    teacher = load_model(TEACHER, device="cpu").eval()
    out[("teacher", f"fp32 torch, {TEACHER_BEST_NFE} Euler steps")] = lambda z: sample(
        teacher, z.shape[0], method="euler", steps=TEACHER_BEST_NFE, seed=0, batch_size=z.shape[0], progress=False
    )
    for name, path in {"teacher": TEACHER, **STUDENTS}.items():
        generator = OneStepGenerator(load_model(path, device="cpu")).eval()
        out[(name, "fp32 torch")] = lambda z, g=generator: g(torch.from_numpy(z))
        for variant, file in VARIANTS.items():
            if (WORK / name / file).is_file():
                session = ort.InferenceSession(str(WORK / name / file), options, providers=["CPUExecutionProvider"])
                out[(name, variant)] = lambda z, s=session: s.run(None, {"noise": z})
    return out


def latencies(threads: int) -> list[dict]:
    runs = runners(threads)
    z = {b: np.random.default_rng(0).standard_normal((b, 1, 32, 32), dtype=np.float32) for b in (1, 64)}
    measured = {key: {1: [], 64: []} for key in runs}
    slow = {key for key in runs if "Euler" in key[1]}
    with torch.no_grad():
        for _ in range(ROUNDS):
            for key, run in runs.items():
                b1 = (1, 3) if key in slow else (10, REPEATS_B1)
                measured[key][1].append(median_ms(lambda: run(z[1]), torch.device("cpu"), *b1))  # noqa: B023
                if key not in slow:
                    ms = median_ms(lambda: run(z[64]), torch.device("cpu"), 2, REPEATS_B64)  # noqa: B023
                    measured[key][64].append(ms / 64)
    rows = []
    for (name, variant), by_batch in measured.items():
        file = (
            WORK / name / VARIANTS[variant] if variant in VARIANTS else TEACHER if name == "teacher" else STUDENTS[name]
        )
        rows.append(
            {
                "model": name,
                "variant": variant,
                "threads": threads,
                "bytes": file.stat().st_size,
                "latency_ms_b1": statistics.median(by_batch[1]),
                "latency_ms_b64": statistics.median(by_batch[64]) if by_batch[64] else None,
                "rounds_b1": by_batch[1],
                "rounds_b64": by_batch[64],
            }
        )
    return rows


def fid(out: Path, weights: Path | None) -> list[dict]:
    cfg = load_config(DEFAULTS)
    entries = []
    for name, path in STUDENTS.items():
        entries.append({"name": f"{name}-torch", "model": str(path)})
        entries += [
            {
                "name": f"{name}-{file.removeprefix('generator.').removesuffix('.onnx').replace('onnx', 'fp32')}",
                "model": str(WORK / name / file),
            }
            for file in VARIANTS.values()
            if (WORK / name / file).is_file()
        ]
    cfg.update(out=str(out), device="cpu", grid=64 if weights is None else 0, entries=entries)
    cfg["metrics"].update(n_samples=2000, batch_size=250, domain_weights=None if weights is None else str(weights))
    cfg["cost"].update(batch_sizes=[1, 64], warmup=2, repeats=5)
    return bench(cfg, command="OMP_NUM_THREADS=1 python benchmarks/edge/run_trained.py")["rows"]


def table(rows: list[dict]) -> str:
    lines = [
        "| model | variant | threads | file (KB) | b1 (ms/img) | b64 (ms/img) | b1 rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        b64 = "—" if row["latency_ms_b64"] is None else f"{row['latency_ms_b64']:.2f}"
        rounds = " / ".join(f"{x:.2f}" for x in row["rounds_b1"])
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['threads']} | {row['bytes'] / 1024:.0f} | "
            f"{row['latency_ms_b1']:.2f} | {b64} | {rounds} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--skip-fid", action="store_true")
    args = parser.parse_args()
    missing = [str(p) for p in STUDENTS.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"trained student files missing: {missing}")
    WORK.mkdir(parents=True, exist_ok=True)
    HERE.mkdir(parents=True, exist_ok=True)
    results: dict = {"exports": {}, "latency": []}
    for name, path in STUDENTS.items():
        results["exports"][name] = export(name, path)
        print(f"exported {name}", flush=True)
    export_model(TEACHER, WORK / "teacher", formats=("onnx",), warmup=2, repeats=20)
    for threads in args.threads:
        results["latency"] += latencies(threads)
        print(table([r for r in results["latency"] if r["threads"] == threads]), flush=True)
    if not args.skip_fid:
        results["fid_domain"] = fid(HERE / "bench", None)
        results["fid_extractor2"] = fid(HERE / "bench-extractor2", EXTRACTOR2)
    elif (HERE / "results.json").is_file():  # a latency-only rerun keeps the FIDs measured before
        before = json.loads((HERE / "results.json").read_text())
        results.update({k: before[k] for k in ("fid_domain", "fid_extractor2") if k in before})
    (HERE / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (HERE / "latency.md").write_text(table(results["latency"]))


if __name__ == "__main__":
    main()
