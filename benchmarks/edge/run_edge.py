"""Edge benchmark (issue 16): fp32 torch vs fp32 ONNX Runtime vs int8 ONNX Runtime (naive and mixed precision).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edge/run_edge.py [--skip-fid]

1. Exports (slimflow.stages.export.export_model, int8 calibrated on 64 seeded noise samples, the mixed file from a
   per-block sensitivity scan within an image RMSE budget) into runs/edge/<model>/ (not committed; export.json
   copies are).
2. Latency, one thread, batch 1 and 64, for every file: median ms/image of three interleaved rounds (each round a
   median of repeated runs), so that load from other processes on the shared cores hits every variant alike.
3. FID (domain) and FID under benchmarks/fmnist-cpu/extractor2/ of the trained model's files, by `slimflow bench`'s
   code (an ONNX entry is run by onnxruntime on the same noise as the torch entry).

Models: the committed teacher's one-step generator (Euler 1, the only trained network committed here), and the
student-s / student-m architectures with seeded random weights (latency and size only: their trained files are
not in the repository; the latency of a network does not depend on its weight values).
Writes benchmarks/edge/results.json, latency.md and bench/ (bench reports), bench-extractor2/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import torch

from pruning.measure import median_ms
from slimflow.checkpoint import save_model
from slimflow.config import load_config
from slimflow.stages.bench import DEFAULTS, bench
from slimflow.stages.export import OneStepGenerator, export_model
from teachers.unet import build_unet
from teachers.zoo import load_model, resolve_model_config

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benchmarks" / "edge"
WORK = ROOT / "runs" / "edge"
TEACHER = ROOT / "teachers" / "weights" / "fmnist_teacher.safetensors"
EXTRACTOR2 = ROOT / "benchmarks" / "fmnist-cpu" / "extractor2" / "domain_net_small.safetensors"
BUDGET = {"teacher": None, "student-s": None, "student-m": None}  # image RMSE budgets; None: half the naive int8's
ROUNDS, REPEATS_B1, REPEATS_B64 = 3, 100, 10


def random_student(preset: str) -> Path:
    torch.manual_seed(0)
    model = build_unet(resolve_model_config({"preset": f"fmnist-{preset}"}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return save_model(WORK / f"{preset}.safetensors", model, {"model": model.config, "kind": "random (latency only)"})


def export(name: str, path: Path) -> dict:
    out = WORK / name
    first = export_model(path, out, formats=("onnx",), int8=True, warmup=2, repeats=20)
    budget = BUDGET[name] or first["int8"]["image_error_to_fp32"]["rmse"] / 2
    report = export_model(path, out, formats=("onnx",), int8=True, int8_budget=budget, warmup=2, repeats=20)
    shutil.copy(out / "export.json", HERE / f"export-{name}.json")
    return report


def latencies(name: str, path: Path) -> dict:
    import onnxruntime as ort

    torch.set_num_threads(1)
    generator = OneStepGenerator(load_model(path)).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    files = {
        "fp32 torch": None,
        "fp32 ORT": WORK / name / "generator.onnx",
        "int8 ORT (naive)": WORK / name / "generator.int8.onnx",
        "int8 ORT (mixed)": WORK / name / "generator.int8-mixed.onnx",
    }
    runs = {}
    for variant, file in files.items():
        if file is None:
            runs[variant] = lambda z: generator(torch.from_numpy(z))
        elif file.is_file():
            session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
            runs[variant] = lambda z, s=session: s.run(None, {"noise": z})
    z = {b: np.random.default_rng(0).standard_normal((b, 1, 32, 32), dtype=np.float32) for b in (1, 64)}
    measured = {v: {1: [], 64: []} for v in runs}
    with torch.no_grad():
        for _ in range(ROUNDS):
            for variant, run in runs.items():
                measured[variant][1].append(median_ms(lambda: run(z[1]), torch.device("cpu"), 10, REPEATS_B1))  # noqa: B023
                measured[variant][64].append(
                    median_ms(lambda: run(z[64]), torch.device("cpu"), 2, REPEATS_B64) / 64  # noqa: B023
                )
    out = {}
    for variant, by_batch in measured.items():
        file = files[variant]
        out[variant] = {
            "latency_ms_b1": statistics.median(by_batch[1]),
            "latency_ms_b64": statistics.median(by_batch[64]),
            "rounds_b1": by_batch[1],
            "rounds_b64": by_batch[64],
            "bytes": (file.stat().st_size if file else path.stat().st_size),
        }
    return out


def fid(out: Path, weights: Path | None) -> list[dict]:
    cfg = load_config(DEFAULTS)
    files = WORK / "teacher"
    cfg.update(
        out=str(out),
        device="cpu",
        grid=64,
        entries=[
            {"name": "teacher-euler-1-torch", "model": str(TEACHER)},
            {"name": "teacher-euler-1-onnx-fp32", "model": str(files / "generator.onnx")},
            {"name": "teacher-euler-1-onnx-int8", "model": str(files / "generator.int8.onnx")},
            *(
                [{"name": "teacher-euler-1-onnx-int8-mixed", "model": str(files / "generator.int8-mixed.onnx")}]
                if (files / "generator.int8-mixed.onnx").is_file()
                else []
            ),
        ],
    )
    cfg["metrics"].update(n_samples=2000, batch_size=250, domain_weights=None if weights is None else str(weights))
    cfg["cost"].update(batch_sizes=[1, 64], warmup=2, repeats=5)
    return bench(cfg, command="OMP_NUM_THREADS=1 python benchmarks/edge/run_edge.py")["rows"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-fid", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    models = {"teacher": TEACHER, "student-s": random_student("student-s"), "student-m": random_student("student-m")}
    results: dict = {"exports": {}, "latency": {}}
    for name, path in models.items():
        results["exports"][name] = export(name, path)
        results["latency"][name] = latencies(name, path)
        print(json.dumps({name: {k: v["latency_ms_b1"] for k, v in results["latency"][name].items()}}), flush=True)
    if not args.skip_fid:
        results["fid_domain"] = fid(HERE / "bench", None)
        results["fid_extractor2"] = fid(HERE / "bench-extractor2", EXTRACTOR2)
    (HERE / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    lines = ["| model | variant | file (KB) | b1 (ms/img) | b64 (ms/img) | b1 rounds |", "|---|---|---|---|---|---|"]
    for name, variants in results["latency"].items():
        for variant, row in variants.items():
            rounds = " / ".join(f"{x:.2f}" for x in row["rounds_b1"])
            lines.append(
                f"| {name} | {variant} | {row['bytes'] / 1024:.0f} | {row['latency_ms_b1']:.2f} | "
                f"{row['latency_ms_b64']:.2f} | {rounds} |"
            )
    (HERE / "latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
