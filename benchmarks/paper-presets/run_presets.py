"""Cost of the paper presets' stages at batch 8 on this CPU, to size a GPU run (issue 14).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paper-presets/run_presets.py

For each preset (configs/paper/: cifar10, ffhq64, imagenet64) the smoke run of tests/paper_smoke.py at batch 8 with
3 optimizer steps per training stage, each stage in a fresh process (`--child STAGE PRESET`), in order: teacher,
pairs, anneal, distill (the run preset's sections as stand-alone stages, as `slimflow run` chains them), prune,
bench. Work files go to runs/paper-presets/ (not committed); results.json and table.md here.

- seconds per step: from the stage's own TensorBoard log (train/img_per_s, logged every step, is the rate since
  the loop started): the mean of steps 2 and 3 (step 1 is a warm-up). Pairs: one batch of 8 pairs at 2 NFE, per
  NFE (the first batch included). Bench: the one-step generation of 8 images by the distilled student
  (its bench entry's latency, one timed run after one warm-up).
- peak memory: the peak resident set size of the stage's process (VmHWM of /proc/self/status), which includes the
  Python/torch runtime (the `baseline` column: the same process after its imports) and the checkpoint and
  model files the stage writes at its end.
- forward MACs per step: slimflow.cost.count_macs of each network evaluation a step makes on one image, times 8
  (backward passes not counted). Distill with the preset's LPIPS (VGG16 at 64x64): its weights cannot be
  downloaded here, so the VGG16 trunk is randomly initialised (its cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benchmarks" / "paper-presets"
WORK = ROOT / "runs" / "paper-presets"
sys.path.insert(0, str(ROOT / "tests"))

from paper_smoke import PRESETS, SMOKE_CLASSES, image_folder, smoke_configs  # noqa: E402

BATCH, STEPS = 8, 3
STAGES = ("teacher", "pairs", "anneal", "distill", "prune", "bench")


def rss_mib() -> float:
    """This process's peak resident set size (VmHWM of /proc/self/status; getrusage's ru_maxrss would carry over
    the parent's peak, which Linux keeps across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


VGG_FILE = WORK / "random-vgg16-features.pth"


def prepare(preset: str) -> None:
    """A clean work folder with the random images, and the randomly initialised torchvision VGG16 `features.*`
    state dict LPIPS reads (cost only)."""
    import torchvision

    shutil.rmtree(WORK / preset, ignore_errors=True)
    image_folder(WORK / preset / "images", PRESETS[preset], classes=SMOKE_CLASSES.get(preset, 0))
    if not VGG_FILE.is_file():
        torch.manual_seed(0)
        features = torchvision.models.vgg16().features.state_dict()
        torch.save({f"features.{k}": v for k, v in features.items()}, VGG_FILE)


def configs(preset: str) -> dict:
    """The smoke configs at batch 8, the run split into its stages, distill with the preset's LPIPS (VGG, 64)."""
    work = WORK / preset
    cfg = smoke_configs(preset, work, work / "images", batch_size=BATCH, steps=STEPS)
    run = cfg.pop("run")
    store, teacher = str(work / "run" / "pairs"), run["teacher"]
    cfg["pairs"] = {**{k: v for k, v in run["pairs"].items() if k != "dir"}, "out": store, "teacher": teacher}
    cfg["anneal"] = {**run["anneal"], "out": str(work / "run" / "anneal"), "pairs": store, "teacher": teacher}
    distill = {**run["distill"], "out": str(work / "run" / "distill"), "pairs": store, "teacher": teacher}
    distill["student"] = str(work / "run" / "anneal" / "annealed_ema.safetensors")
    lpips = {"distance": "lpips-vgg", "options": {"size": 64, "backbone_path": str(VGG_FILE)}}
    distill["loss"].update(lpips)
    cfg["distill"] = distill
    cfg["prune"]["recover"].update(lpips)  # the prune presets recover under the same LPIPS
    return cfg


def seconds_per_step(run_dir: Path) -> float:
    """Mean seconds of steps 2..STEPS from the run's train/img_per_s (rate since the loop began, every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    rate = {e.step: e.value for e in events.Scalars("train/img_per_s")}
    elapsed = {step: step * BATCH / value for step, value in rate.items()}
    return (elapsed[STEPS] - elapsed[1]) / (STEPS - 1)


def child(stage_name: str, preset: str) -> dict:
    """Run one stage of `preset` in this (fresh) process and report its time per step and peak memory."""
    from slimflow.stages import stage

    cfg = configs(preset)[stage_name]
    if stage_name == "bench":  # the one-step student only (the slow test runs every entry)
        cfg["entries"] = [e for e in cfg["entries"] if e["name"] == "distilled-1step"]
    baseline = rss_mib()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out: dict = {"stage": stage_name, "preset": preset, "date": date, "baseline_rss_mib": baseline}
    started = time.time()
    try:
        result = stage(stage_name)[1](cfg)
    except ValueError as err:
        return {**out, "error": str(err), "wall_s": time.time() - started, "peak_rss_mib": rss_mib()}
    out.update(wall_s=time.time() - started, peak_rss_mib=rss_mib())
    if stage_name in ("teacher", "anneal", "distill"):
        out["s_per_step"] = seconds_per_step(Path(cfg["out"]))
    elif stage_name == "prune":  # the cut, then recovery steps on the pruned student
        models = result["models"]
        out.update(
            s_per_step=seconds_per_step(Path(cfg["out"]) / "recover"),
            macs_kept=models["pruned"]["macs"] / models["unpruned"]["macs"],
            params_after=models["pruned"]["params"],
            cut_s=result["prune"]["seconds"],
        )
    elif stage_name == "pairs":
        nfe = result["nfe_per_pair_mean"]
        out.update(nfe_per_pair=nfe, s_per_nfe=BATCH / result["pairs_per_s"] / nfe)
    elif stage_name == "bench":
        rows = {row["name"]: row for row in result["rows"]}
        out["s_per_batch"] = {name: row[f"latency_ms_b{BATCH}"] * BATCH / 1000 for name, row in rows.items()}
    return out


def forward_macs(preset: str) -> dict:
    """Forward MACs of one image through each network a step evaluates (slimflow.cost.count_macs)."""
    import torchvision

    from pruning.measure import count_macs_params
    from slimflow.cost import count_macs
    from teachers.zoo import build_model

    size = PRESETS[preset]
    cfg = configs(preset)
    shape = (3, size, size)
    teacher = build_model({**cfg["teacher"]["model"], "resolution": size})
    student = build_model({**cfg["anneal"]["model"], "resolution": size})
    vgg = torchvision.models.vgg16().features.eval()
    return {
        "teacher": count_macs(teacher, shape),
        "student": count_macs(student, shape),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "student_preset": cfg["anneal"]["model"]["preset"],
        "lpips_vgg_64": count_macs_params(vgg, (torch.randn(1, 3, 64, 64),))[0],
    }


def table(results: dict) -> str:
    g = 1e9
    lines = [
        "| preset | stage | networks per image per step | fwd GMACs / step (batch 8) | s / step (batch 8) | "
        "peak RSS (MiB) | baseline RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, r in results.items():
        m, s = r["macs"], r["stages"]
        t, st, v = m["teacher"], m["student"], m["lpips_vgg_64"]
        rows = {
            "teacher": ("teacher fwd+bwd", t, s["teacher"].get("s_per_step")),
            "pairs": ("teacher fwd, per NFE", t, s["pairs"].get("s_per_nfe")),
            "anneal": ("student fwd+bwd", st, s["anneal"].get("s_per_step")),
            "distill": (
                "student 2 fwd+bwd, guide 1 fwd, LPIPS-VGG 4 at 64²",
                3 * st + 4 * v,
                s["distill"].get("s_per_step"),
            ),
            "prune": (
                "pruned student fwd+bwd, student 1 fwd, LPIPS-VGG 2 at 64²",
                s["prune"]["macs_kept"] * st + st + 2 * v if "macs_kept" in s["prune"] else None,
                s["prune"].get("s_per_step"),
            ),
            "bench": ("student fwd, one-step generation", st, s["bench"].get("s_per_batch", {}).get("distilled-1step")),
        }
        for name, (what, macs, seconds) in rows.items():
            stage = s[name]
            lines.append(
                f"| {preset} | {name} | {what} | {'n/a' if macs is None else f'{BATCH * macs / g:.1f}'} | "
                f"{'n/a' if seconds is None else f'{seconds:.2f}'} | {stage['peak_rss_mib']:.0f} | "
                f"{stage['baseline_rss_mib']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "PRESET"))
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument(
        "--stages",
        nargs="*",
        default=list(STAGES),
        choices=STAGES,
        help="re-measure only these stages on the work files of an earlier full run; the other rows of "
        "results.json are kept (each stage records its date)",
    )
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)))
        return
    started = time.time()
    partial = list(args.stages) != list(STAGES)
    results = json.loads((HERE / "results.json").read_text())["results"] if partial else {}
    for preset in args.presets:
        if not partial:
            prepare(preset)
        stages = results.get(preset, {}).get("stages", {})
        for name in args.stages:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, preset], capture_output=True, text=True, check=False
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{preset} {name} failed:\n{proc.stderr[-3000:]}")
            stages[name] = json.loads(line[-1].removeprefix("RESULT "))
            print(preset, name, json.dumps(stages[name])[:300], flush=True)
        results[preset] = {"macs": forward_macs(preset), "stages": stages}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "batch_size": BATCH,
        "steps": STEPS,
        "wall_s": time.time() - started,
        **({"stages_measured": args.stages} if partial else {}),
        "results": results,
    }
    (HERE / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (HERE / "table.md").write_text(table(results))
    print(table(results))
    print(f"wall {report['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
