import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_training import loss_fn, make_batch, make_trainer, train

from slimflow import checkpoint as ckpt
from slimflow.engine import NonFiniteLossError, batch_indices, ema_decay, warmup_lr

HERE = Path(__file__).parent


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_schedules_and_batch_indices():
    assert warmup_lr(0, 1.0, 10) == pytest.approx(0.1)
    assert warmup_lr(9, 1.0, 10) == 1.0 and warmup_lr(500, 1.0, 10) == 1.0
    assert ema_decay("power", 0, 0.9, 0.999999) == pytest.approx(0.1)
    assert ema_decay("power", 10**9, 0.9, 0.999999) == 0.999999
    # consecutive steps walk through each epoch's permutation: every index exactly once per epoch
    n, b = 50, 8
    seen = torch.cat([batch_indices(s, b, n, seed=3) for s in range(25)])  # 200 = 4 epochs
    for epoch in range(4):
        assert sorted(seen[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert torch.equal(batch_indices(7, b, n, 3), batch_indices(7, b, n, 3))
    assert not torch.equal(batch_indices(7, b, n, 3), batch_indices(7, b, n, 4))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    full, _ = train(tmp_path / "full", steps=20)
    part, first = train(tmp_path / "part", steps=9)  # stops at step 9: last periodic checkpoint was 8, final 9
    assert not first["resumed"]
    resumed, second = train(tmp_path / "part", steps=20)
    assert second["resumed"] and resumed.step == 20
    assert _equal_state(full.model, resumed.model)
    assert _equal_state(full.ema, resumed.ema)
    assert not _equal_state(part.model, resumed.model)


def test_sigint_stops_between_steps_and_resumes_exactly(tmp_path):
    full, _ = train(tmp_path / "full", steps=14)

    def interrupting_batch(step, gen):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return make_batch(step, gen)

    with pytest.raises(KeyboardInterrupt, match="after step 7"):
        make_trainer(tmp_path / "cut", steps=14).fit(interrupting_batch, loss_fn)
    assert ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "ckpt-00000007"
    resumed, _ = train(tmp_path / "cut", steps=14)
    assert _equal_state(full.model, resumed.model)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    def exploding(model, batch):
        loss = loss_fn(model, batch)
        return loss * float("nan") if batch["t"].numel() and exploding.calls >= 5 else loss

    exploding.calls = 0

    def counting_batch(step, gen):
        exploding.calls = step
        return make_batch(step, gen)

    trainer = make_trainer(tmp_path, steps=10, ckpt_every=2)
    with pytest.raises(NonFiniteLossError, match="at step 5.*ckpt-00000004"):
        trainer.fit(counting_batch, exploding)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "ckpt-00000004"


def test_corrupt_checkpoint_is_refused(tmp_path):
    train(tmp_path, steps=4)
    weights = tmp_path / "checkpoints" / "ckpt-00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors.*corrupt"):
        train(tmp_path, steps=8)
    weights.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        train(tmp_path, steps=8)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    train(tmp_path, steps=4, hidden=32)
    with pytest.raises(ckpt.CheckpointError, match="hidden: checkpoint has 32, model has 16"):
        train(tmp_path, steps=8, hidden=16)


def test_load_state_checked_lists_what_does_not_fit():
    from tiny_training import TinyVelocity

    state = TinyVelocity(hidden=8).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["net.0.bias"]
    with pytest.raises(ckpt.CheckpointError, match="missing: net.0.bias.*unexpected: extra.weight.*wrong shape"):
        ckpt.load_state_checked(TinyVelocity(hidden=4), state, "test")


def test_tensorboard_event_file_has_the_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, steps=5)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_two_process_torchrun_matches_one_process(tmp_path):
    single, result = train(tmp_path / "one", steps=12, dropout=0.0)
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(HERE / "ddp_train_script.py"),
            str(tmp_path / "two"),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert ddp["world"] == 2
    single_losses = [h["train/loss"] for h in result["history"]]
    assert ddp["losses"] == pytest.approx(single_losses, rel=1e-4, abs=1e-6)
    for key, value in single.model.state_dict().items():
        assert torch.allclose(torch.tensor(ddp["weights"][key]), value, atol=1e-5), key


def test_learning_rate_schedules_match_their_closed_forms():
    from slimflow.engine import TRAIN_DEFAULTS, check_train_config, learning_rate

    cfg = {**TRAIN_DEFAULTS, "lr": 1.0, "warmup": 10, "steps": 110, "min_lr": 0.1}
    constant = [learning_rate(s, cfg) for s in range(110)]
    assert constant == [warmup_lr(s, 1.0, 10) for s in range(110)]  # the default is the old schedule exactly
    cosine = {**cfg, "lr_schedule": "cosine"}
    linear = {**cfg, "lr_schedule": "linear"}
    assert learning_rate(4, cosine) == learning_rate(4, linear) == pytest.approx(0.5)  # warm-up untouched
    assert learning_rate(10, cosine) == learning_rate(10, linear) == pytest.approx(1.0)
    assert learning_rate(60, cosine) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(π/2) = 0
    assert learning_rate(35, cosine) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(35, linear) == pytest.approx(0.1 + 0.9 * 0.75)
    assert learning_rate(110, cosine) == learning_rate(110, linear) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="train.lr_schedule"):
        check_train_config({**cfg, "lr_schedule": "step"})
    with pytest.raises(ValueError, match="train.min_lr"):
        check_train_config({**cfg, "min_lr": 2.0})


def test_the_trainer_follows_the_schedule(tmp_path):
    from slimflow.engine import learning_rate

    trainer, result = train(tmp_path / "run", steps=12, lr_schedule="linear", min_lr=1e-3)
    lrs = [row["train/lr"] for row in result["history"]]  # log_every 1: the lr of every step
    assert lrs == pytest.approx([learning_rate(s, trainer.cfg) for s in range(12)])
    assert lrs[-1] < lrs[5] and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[-1])


def test_logged_losses_are_window_means(tmp_path):
    from slimflow.engine import window_means

    rows = [{"train/loss": 1.0, "train/lr": 0.1}, {"train/loss": 3.0, "train/lr": 0.2}]
    assert window_means(rows) == {"train/loss": 2.0, "train/lr": 0.2}
    every, per_step = train(tmp_path / "a", steps=8, log_every=4)[1], train(tmp_path / "b", steps=8)[1]
    losses = [row["train/loss"] for row in per_step["history"]]
    assert [row["train/loss"] for row in every["history"]] == pytest.approx([sum(losses[:4]) / 4, sum(losses[4:]) / 4])
