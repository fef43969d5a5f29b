"""The smoke run of the paper presets (configs/paper/), shared by tests/test_paper_presets.py and
benchmarks/paper-presets/run_presets.py: every stage of a preset at its real architecture and resolution, on a
folder of random PNGs, with tiny overrides (a few steps and pairs, an Euler solver with 2 NFE, a handful of samples).

What the overrides switch, because no pretrained weights can be downloaded here: the distillation and recovery
distance LPIPS (VGG) becomes l2, and the bench's Inception extractor becomes the project's domain network. The data
is the folder of random images in place of CIFAR-10 / FFHQ / ImageNet.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from slimflow.config import load_config
from slimflow.stages import stage

PRESETS = {"cifar10": 32, "ffhq64": 64, "imagenet64": 64}  # preset -> image size
SMOKE_CLASSES = {"imagenet64": 2}  # class-conditional presets: class sub-folders of the random images
PRESET_FILES = {  # command stage -> preset file of a data set
    "teacher": "paper/{}-teacher",
    "run": "paper/{}",
    "prune": "paper/{}-prune",
    "bench": "paper/{}-bench",
}


def image_folder(root: str | Path, size: int, n: int = 24, seed: int = 0, classes: int = 0) -> Path:
    """`n` random RGB PNGs of size×size under `root` (created), the stand-in for a data set; with `classes`, image
    i goes to the sub-folder of class i mod classes (labelled, as ImageNet's train/ folder)."""
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % classes}" if classes else root
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def preset_config(command: str, preset: str, update: dict | None = None) -> dict:
    """A paper preset merged onto its command's defaults (unknown keys are refused), with `update` on top."""
    module, _ = stage(command)
    return load_config(module.DEFAULTS, PRESET_FILES[command].format(preset), update=update)


def _train(batch_size: int, steps: int) -> dict:
    return {"steps": steps, "batch_size": batch_size, "log_every": 1, "sample_every": 0, "ckpt_every": 0}


def _work_path(model: str, preset: str, work: Path) -> str:
    """A model path of the presets (runs/paper/<preset>...) moved under `work`."""
    for prefix, folder in (("-teacher/", "teacher/"), ("-prune/", "prune/"), ("/", "run/")):
        start = f"runs/paper/{preset}{prefix}"
        if model.startswith(start):
            return str(work / folder / model.removeprefix(start))
    raise ValueError(f"bench entry model {model!r} is not one of the preset's runs")


def smoke_configs(preset: str, work: str | Path, images: str | Path, batch_size: int = 2, steps: int = 1) -> dict:
    """{command stage: merged config} of `preset` (teacher, run, prune, bench) writing under `work`, with the
    smoke overrides of the module docstring: `steps` optimizer steps of `batch_size` in every training stage,
    2 * batch_size pairs, 2 * batch_size samples per bench entry."""
    work, size = Path(work), PRESETS[preset]
    train = _train(batch_size, steps)
    teacher = preset_config(
        "teacher",
        preset,
        {
            "out": str(work / "teacher"),
            "data": {"name": "image_folder", "root": str(images)},
            "train": train,
            "sample": {"n": 2, "steps": 2},
        },
    )
    run = preset_config(
        "run",
        preset,
        {
            "out": str(work / "run"),
            "teacher": str(work / "teacher" / "teacher_ema.safetensors"),
            "pairs": {
                "n": 2 * batch_size,
                "batch_size": batch_size,
                "shard_size": 2 * batch_size,
                "solver": {"method": "euler", "steps": 2},
            },
            "anneal": {"train": train, "sample": {"n": 2}},
            "distill": {"loss": {"distance": "l2"}, "train": train, "sample": {"n": 2}},
            "grids": {"n": 2},
        },
    )
    run["distill"]["loss"]["options"] = {}  # LPIPS's options (size) do not apply to l2
    prune = preset_config(
        "prune",
        preset,
        {
            "out": str(work / "prune"),
            "student": str(work / "run" / "distill" / "distilled_ema.safetensors"),
            "recover": {"distance": "l2", "train": train},
            "compare": {"n": 2},
        },
    )
    prune["recover"]["options"] = {}
    bench = preset_config(
        "bench",
        preset,
        {
            "out": str(work / "bench"),
            "reference": {"name": "image_folder", "root": str(images), "image_size": size},
            "metrics": {
                "extractors": ["domain"],
                "n_samples": 2 * batch_size,
                "batch_size": batch_size,
                "cache_dir": str(work / "metrics-cache"),
            },
            "cost": {"batch_sizes": [batch_size], "warmup": 1, "repeats": 1},
            "grid": 2,
        },
    )
    entries = copy.deepcopy(bench["entries"])
    for entry in entries:
        entry["model"] = _work_path(entry["model"], preset, work)
        if entry["method"] == "dopri5":  # a random teacher's adaptive solve has no useful length: 2 NFE
            entry.update(method="euler", steps=2)
    bench["entries"] = entries
    return {"teacher": teacher, "run": run, "prune": prune, "bench": bench}
