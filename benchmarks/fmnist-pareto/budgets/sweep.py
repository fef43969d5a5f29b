"""Requested vs reached MACs fraction: one ratio for all layers (ratio_for_macs) vs per-layer widths
(plan_for_macs), nearest and at most, GroupNorm whole_groups; one JSON line per model and fraction.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fmnist-pareto/budgets/sweep.py 0.182,0.321 teacher
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fmnist-pareto/budgets/sweep.py 0.15,0.4,0.8 student-s
"""

import copy
import json
import sys
import time

import torch

from pruning.measure import count_macs_params
from pruning.structured import StructuredPruner, plan_for_macs, ratio_for_macs
from teachers.pruned import example_inputs, unet_custom_pruners
from teachers.unet import build_unet
from teachers.zoo import load_model, resolve_model_config


def models():
    yield "fmnist-teacher (weights)", load_model("teachers/weights/fmnist_teacher.safetensors")
    for name in ("fmnist-student-s", "fmnist-student-m", "fmnist-student-l"):
        torch.manual_seed(0)
        yield name, build_unet(resolve_model_config({"preset": name}))


kw = {"custom_pruners": unet_custom_pruners(), "groupnorm": "whole_groups"}
fractions = [float(x) for x in sys.argv[1].split(",")]
only = sys.argv[2] if len(sys.argv) > 2 else None
for name, model in models():
    if only and only not in name:
        continue
    model = model.float().train().requires_grad_(True)
    inputs = example_inputs(model.config)
    base = count_macs_params(model, inputs)[0]
    for f in fractions:
        row = {"model": name, "base_macs": base, "requested": f}
        for nearest in (True, False):
            t = time.time()
            r = ratio_for_macs(model, inputs, f, nearest=nearest, **kw)
            trial = copy.deepcopy(model)
            StructuredPruner(trial, inputs, ratio=r, **kw).step()
            row["single_" + ("nearest" if nearest else "at_most")] = count_macs_params(trial, inputs)[0] / base
            plan = plan_for_macs(model, inputs, f, nearest=nearest, **kw)
            row["per_layer_" + ("nearest" if nearest else "at_most")] = plan.fraction
            row["blocks_" + ("nearest" if nearest else "at_most")] = plan.extra_blocks
            row["s_" + ("nearest" if nearest else "at_most")] = round(time.time() - t, 1)
        print(json.dumps(row), flush=True)
