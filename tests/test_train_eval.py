"""Periodic evaluation during training (train.eval_every): logged to real TensorBoard files, equal to the same
figure computed afterwards from the exported model, and invisible to training (weights byte-identical with it on
or off, even when the evaluation itself draws random numbers and the model has dropout)."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_training import loss_fn, make_batch, make_trainer

from slimflow.checkpoint import latest_checkpoint, load_training_checkpoint, read_model_file, save_model
from slimflow.losses import l2
from slimflow.pairs import PairStore, generate_pairs
from slimflow.sample import one_step_images
from slimflow.stages.anneal import anneal
from slimflow.stages.distill import distill
from slimflow.stages.prune import prune_student
from slimflow.stages.runner import start_run_dir
from teachers.unet import UNet, build_unet
from teachers.zoo import load_model

SHAPE = (1, 8, 8)
TINY_UNET = {"preset": None, "nf": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.1}
TRAIN = {"steps": 4, "batch_size": 8, "warmup": 2, "log_every": 2, "ckpt_every": 2}
EVAL = {"eval_every": 3, "eval_n": 6}


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_evaluation_is_logged_and_leaves_training_bit_identical(tmp_path):
    seen = []

    def eval_fn(model):
        seen.append((model.training, torch.is_grad_enabled()))
        torch.randn(100)  # an evaluation that draws from the global RNG must not shift dropout's draws
        x = torch.linspace(-1, 1, 8).view(4, 2)
        return {"probe": model(x, torch.zeros(4)).square().mean()}

    runs = {}
    for name, every in (("off", 0), ("on", 3)):
        trainer = make_trainer(tmp_path / name, 8, dropout=0.3, eval_every=every)
        trainer.eval_fn = eval_fn
        runs[name] = trainer, trainer.fit(make_batch, loss_fn)
    (off, off_result), (on, on_result) = runs["off"], runs["on"]
    for a, b in ((off.model, on.model), (off.ema, on.ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [r["train/loss"] for r in off_result["history"]] == [r["train/loss"] for r in on_result["history"]]
    assert seen == [(False, False)] * 3 and on.model.training  # eval mode, no grad, train mode restored
    assert [e["step"] for e in on_result["evals"]] == [3, 6, 8] and off_result["evals"] == []
    logged = scalars(tmp_path / "on", "eval/probe")
    assert [s for s, _ in logged] == [3, 6, 8]
    assert logged[-1][1] == pytest.approx(on_result["evals"][-1]["eval/probe"])
    assert scalars(tmp_path / "off", "eval/probe") == []


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    teacher = UNet(1, 8, 8, [1, 2], 1, [], 0.0)
    solver = {"method": "euler", "steps": 2}
    generate_pairs(teacher, root / "pairs", 16, SHAPE, 0, solver, shard_size=16, batch_size=16, progress=False)
    return root


def last_pairs_l2(model_file, store_dir, n: int) -> float:
    model, store = load_model(model_file), PairStore(store_dir)
    z, x = store.get(torch.arange(len(store) - n, len(store)))
    with torch.no_grad():
        return l2(one_step_images(model, z), x).mean().item()


def test_anneal_and_distill_log_the_one_step_distance_on_the_last_pairs_without_changing_the_weights(pairs):
    root = pairs
    base = {"pairs": str(root / "pairs"), "sample": {"n": 4, "seed": 0}}
    exports = {}
    for name, train in (("off", TRAIN), ("on", {**TRAIN, **EVAL})):
        annealed = anneal({**base, "out": str(root / f"anneal-{name}"), "model": TINY_UNET, "train": train})
        distilled = distill(
            {**base, "out": str(root / f"distill-{name}"), "student": annealed["export"], "train": train}
        )
        exports[name] = annealed, distilled
    for stage in range(2):
        off, on = (read_model_file(exports[k][stage]["export"])[1] for k in ("off", "on"))
        assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off), stage
        raw = [
            load_training_checkpoint(latest_checkpoint(root / f"{s}-{k}" / "checkpoints"))[1]["model"]
            for s in ("anneal" if stage == 0 else "distill",)
            for k in ("off", "on")
        ]
        assert all(torch.equal(raw[0][k], raw[1][k]) for k in raw[0])
    for stage, summary in zip(("anneal", "distill"), exports["on"]):
        logged = scalars(root / f"{stage}-on", "eval/one_step_l2_to_teacher")
        assert [s for s, _ in logged] == [3, 4]  # every 3 steps and at the last
        # the last evaluation is of the exported (EMA) model on the store's last eval_n pairs
        expected = last_pairs_l2(summary["export"], root / "pairs", EVAL["eval_n"])
        assert logged[-1][1] == pytest.approx(expected, rel=1e-5)
        assert summary["eval"]["eval/one_step_l2_to_teacher"] == pytest.approx(expected, rel=1e-5)
        assert scalars(root / f"{stage}-off", "eval/one_step_l2_to_teacher") == [] and "eval" not in exports["off"][0]


def test_prune_recovery_logs_the_distance_to_the_unpruned_student(tmp_path):
    torch.manual_seed(0)
    config = {"in_channels": 1, "resolution": 8, "nf": 16, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": []}
    model = build_unet(config)
    student = save_model(tmp_path / "s.safetensors", model, {"model": model.config, "kind": "distilled-student"})
    train = {**TRAIN, "ema": {"kind": "none"}, "eval_every": 2, "eval_n": 5}
    recover = {"mode": "one_step", "distance": "l2", "train": train}
    cfg = {"out": str(tmp_path / "p"), "student": str(student), "recover": recover, "compare": {"n": 5, "seed": 3}}
    summary = prune_student(cfg)
    logged = scalars(tmp_path / "p" / "recover", "eval/one_step_l2_to_unpruned")
    assert [s for s, _ in logged] == [2, 4]
    # eval_n = compare.n: the last evaluation is the comparison's figure for the recovered model
    assert logged[-1][1] == pytest.approx(summary["models"]["recovered"]["l2_to_unpruned"], rel=1e-5)


def test_a_run_written_before_the_evaluation_settings_resumes_with_evaluation_on(tmp_path):
    old = {"train": {"lr": 1e-3, "steps": 10}}
    start_run_dir(tmp_path, old)  # its config.yaml has no eval_every / eval_n
    start_run_dir(tmp_path, {"train": {**old["train"], "eval_every": 5, "eval_n": 32}})
    start_run_dir(tmp_path, {"train": {**old["train"], "eval_every": 0, "eval_n": 256}})  # and off again
