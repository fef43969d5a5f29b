"""Does annealing reflow's joint flip make the students emit mirrored footwear?

Fashion-MNIST shoes, sandals and boots almost all point the same way. Annealing reflow's joint flip trains the student
on (flip z, flip x̂) as well, pairs the teacher never produced, so it could emit mirrored shoes that no real image
has, and that would cost FID at the reflow stage. This script counts them: images the domain net calls footwear
(sandal, sneaker, ankle boot) are compared with the mean real footwear image and its mirror; "mirrored" = closer
(cosine) to the mirror.
Rows: the real test set, the teacher's 16-NFE pairs, and each one-step student of the benchmark (2,000 samples,
the benchmark's noise). Output: orientation.md next to this script.

Run from the repository root after the benchmark:  OMP_NUM_THREADS=1 python benchmarks/fmnist-cpu/orientation.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from slimflow.data import load_images, to_float, to_uint8  # noqa: E402
from slimflow.domain_net import load_domain_net  # noqa: E402
from slimflow.pairs import PairStore  # noqa: E402
from slimflow.sample import sample  # noqa: E402
from teachers.zoo import load_model  # noqa: E402

HERE = Path(__file__).resolve().parent
FOOTWEAR = (5, 7, 9)  # sandal, sneaker, ankle boot
STUDENTS = [
    "s-reflow-l2-annealed",
    "s-slimflow-annealed",
    "s-reflow-l2-distilled",
    "s-slimflow-distilled",
    "s-slimflow-l2-distilled",
    "m-reflow-l2-annealed",
    "m-slimflow-annealed",
    "m-reflow-l2-distilled",
    "m-slimflow-distilled",
]


def classify(net, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)])


def mirrored_share(images: torch.Tensor, labels: torch.Tensor, template: torch.Tensor) -> tuple[float, float]:
    """(share of footwear among the images, share of that footwear closer to the mirrored template)."""
    shoes = images[torch.isin(labels, torch.tensor(FOOTWEAR))].flatten(1)
    if len(shoes) == 0:
        return 0.0, float("nan")
    same = F.cosine_similarity(shoes, template.flatten()[None], dim=1)
    mirror = F.cosine_similarity(shoes, template.flip(-1).flatten()[None], dim=1)
    return len(shoes) / len(images), (mirror > same).float().mean().item()


def main() -> None:
    net = load_domain_net()
    real = to_float(load_images("fashion_mnist", split="test").images)
    real_labels = classify(net, real)
    template = real[torch.isin(real_labels, torch.tensor(FOOTWEAR))].mean(0)
    sources = {"real test images": real}
    store = PairStore(Path("runs/ablation/pairs"))
    sources["teacher 16-NFE pairs (3,000)"] = store.batch(torch.arange(len(store)))[1]
    for name in STUDENTS:
        model_file = {"annealed": "anneal/annealed_ema.safetensors", "distilled": "distill/distilled_ema.safetensors"}
        run = name.rsplit("-", 1)[0]
        path = Path("runs/ablation") / run / model_file[name.rsplit("-", 1)[1]]
        images, _ = sample(load_model(path), 2000, seed=0)
        sources[name] = to_float(to_uint8(images))  # as the benchmark sees them
    lines = [
        "# Mirrored footwear in one-step samples",
        "",
        "Command: `OMP_NUM_THREADS=1 python benchmarks/fmnist-cpu/orientation.py` (see its docstring).",
        "",
        "| images | footwear share | mirrored footwear |",
        "|---|---|---|",
    ]
    for name, images in sources.items():
        share, mirrored = mirrored_share(images, classify(net, images), template)
        lines.append(f"| {name} | {share:.1%} | {mirrored:.1%} |")
        print(lines[-1], flush=True)
    (HERE / "orientation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
