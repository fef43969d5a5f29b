"""Run by tests/test_engine.py under `torchrun --nproc_per_node 2`: trains the tiny task, rank 0 dumps the losses."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_training import train  # noqa: E402

run_dir, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
trainer, result = train(run_dir, steps=12, dropout=0.0)
if trainer.rank == 0:
    losses = [h["train/loss"] for h in result["history"]]
    weights = {k: v.tolist() for k, v in trainer.model.state_dict().items()}
    Path(out).write_text(json.dumps({"world": trainer.world, "losses": losses, "weights": weights}))
