"""One row per class: the conditional teacher at 16 Euler steps and the conditional one-step student, on the same
noise (seed 0, sample i of row c: noise index 10·c + i).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fmnist-cond/class_grid.py

Writes benchmarks/fmnist-cond/class_grid_teacher16.png and class_grid_student.png (rows: classes 0-9 of
Fashion-MNIST, T-shirt/top to ankle boot).
"""

from pathlib import Path

import torch

from slimflow.images import save_grid
from slimflow.sample import sample
from teachers.zoo import load_model

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benchmarks" / "fmnist-cond"
PER_CLASS = 10
LABELS = torch.arange(10).repeat_interleave(PER_CLASS)  # row c holds class c
MODELS = {
    "teacher16": (ROOT / "teachers" / "weights" / "fmnist_cond_teacher.safetensors", 16),
    "student": (HERE / "models" / "cond-m-slimflow-distilled.safetensors", 1),
}

if __name__ == "__main__":
    for name, (path, steps) in MODELS.items():
        images, _ = sample(load_model(path, device="cpu").eval(), len(LABELS), steps=steps, seed=0, labels=LABELS)
        print(save_grid(images, HERE / f"class_grid_{name}.png", nrow=PER_CLASS))
