"""Widths as pruned vs widths rounded to multiples of 8: the teacher pruned to fmnist-student-s's MACs (18.2 %)
with per-layer refinement (whole GroupNorm groups of 4 channels), once with removals in steps of one group and
once with `round_to=8` (removals in multiples of 8 channels: the teacher's widths, 24/48/96, stay multiples of 8).
CPU latency, one thread, batch 1 and 64: `pruning.measure.measure_latency` (median of its repeats) per round, the
models interleaved within each round (the cores are shared), then the median over rounds, and the median over
rounds of each model's time over the as-pruned model's in the same round (paired, so a load change between rounds
cancels).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fmnist-pareto/budgets/rounding.py [rounds]
"""

import copy
import json
import statistics
import sys
from collections import Counter

import torch

from pruning.measure import count_macs_params, measure_latency
from pruning.structured import plan_for_macs, prune_structured
from teachers.pruned import example_inputs, unet_custom_pruners
from teachers.zoo import load_model

torch.set_num_threads(1)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
teacher = load_model("teachers/weights/fmnist_teacher.safetensors").float().train().requires_grad_(True)
inputs = example_inputs(teacher.config)
base, _ = count_macs_params(teacher, inputs)
models, rows = {"teacher": teacher.eval()}, {}
for name, extra in (("as pruned (steps of 4)", {}), ("rounded to 8", {"round_to": 8})):
    kwargs = {"custom_pruners": unet_custom_pruners(), "groupnorm": "whole_groups", **extra}
    plan = plan_for_macs(teacher, inputs, 0.182, nearest=True, **kwargs)
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    report = prune_structured(model, inputs, ratio=plan.ratio, extra_blocks=plan.extra_blocks, **kwargs)
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    models[name] = model.eval().requires_grad_(False)
    rows[name] = {
        "ratio": plan.ratio,
        "extra_blocks": plan.extra_blocks,
        "macs_fraction": report["macs_after"] / base,
        "params": report["params_after"],
        "conv_widths": dict(sorted(Counter(widths).items())),
        "conv_widths_not_multiple_of_8": sum(w % 8 != 0 for w in widths),
    }
rows["teacher"] = {"macs_fraction": 1.0, "params": count_macs_params(teacher, inputs)[1]}
times = {name: {1: [], 64: []} for name in models}
with torch.no_grad():
    for _ in range(rounds):
        for batch in (1, 64):
            x = example_inputs(teacher.config, batch=batch)
            x = (torch.randn_like(x[0]), torch.rand(batch))
            for name, model in models.items():
                times[name][batch].append(measure_latency(model, x, warmup=2, repeats=5))
reference = "as pruned (steps of 4)"
for name in models:
    for batch in (1, 64):  # paired per round: both models ran within seconds of each other, under the same load
        ratios = [a / b for a, b in zip(times[name][batch], times[reference][batch])]
        rows[name][f"latency_vs_as_pruned_b{batch}"] = statistics.median(ratios)
    rows[name]["ms_b1"] = statistics.median(times[name][1])
    rows[name]["ms_per_image_b64"] = statistics.median(times[name][64]) / 64
    rows[name]["ms_b1_rounds"] = [round(t, 2) for t in times[name][1]]
    rows[name]["ms_b64_rounds"] = [round(t, 1) for t in times[name][64]]
print(json.dumps({"rounds": rounds, "torch_threads": torch.get_num_threads(), "models": rows}, indent=1))
