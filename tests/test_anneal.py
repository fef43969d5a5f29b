"""Annealing reflow: β schedules (closed forms), the noise perturbation, joint per-sample flips, and the stage."""

import json
import math

import pytest
import torch

from slimflow.checkpoint import read_model_file, save_model
from slimflow.domain_net import DEFAULT_WEIGHTS as DOMAIN_WEIGHTS
from slimflow.engine import batch_indices
from slimflow.flow import flow_matching_batch
from slimflow.pairs import PairStore, PairStoreError, generate_pairs
from slimflow.stages.anneal import (
    DEFAULTS,
    anneal,
    anneal_loss,
    beta_schedule,
    copy_matching,
    make_anneal_batch,
    perturb_noise,
)
from slimflow.stages.runner import full_config, start_run_dir
from teachers.unet import UNet

SHAPE = (1, 8, 8)
TINY_UNET = {"preset": None, "nf": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
TINY_TRAIN = {
    "steps": 4,
    "batch_size": 8,
    "warmup": 2,
    "log_every": 2,
    "ckpt_every": 2,
    "ema": {"kind": "power", "decay": 0.999, "max_decay": 0.999},
}


def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A plain-function 'teacher' (dx/dt = 1 − x) that makes images that are not left-right symmetric."""
    return 1.0 - x


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    generate_pairs(
        field,
        root,
        n=32,
        shape=SHAPE,
        seed=0,
        solver={"method": "euler", "steps": 2},
        shard_size=16,
        batch_size=16,
        teacher_hash="field:1-x",
        progress=False,
    )
    return root


def tiny_teacher_file(path, seed: int):
    torch.manual_seed(seed)
    teacher = UNet(1, 8, 8, [1, 2], 1, [], 0.0)
    return save_model(path, teacher, {"model": teacher.config, "kind": "test-teacher"}), teacher


# ------------------------------------------------------------------------------------------------ β schedules
@pytest.mark.parametrize(
    "kind, step, n, expected",
    [
        ("linear", 0, 100, 1.0),
        ("linear", 25, 100, 0.75),
        ("linear", 100, 100, 0.0),
        ("linear", 250, 100, 0.0),
        ("exp", 0, 100, 1.0),
        ("exp", 100, 100, math.exp(-1)),
        ("exp", 300, 100, math.exp(-3)),
        ("cosine", 0, 90, 1.0),
        ("cosine", 30, 90, 0.75),
        ("cosine", 45, 90, 0.5),
        ("cosine", 90, 90, 0.0),
        ("cosine", 200, 90, 0.0),
    ],
)
def test_beta_schedule_closed_forms(kind, step, n, expected):
    assert beta_schedule(kind, step, n) == pytest.approx(expected, abs=1e-12)


def test_constant_beta_and_bad_schedules():
    assert beta_schedule("constant", 12345, 10, value=0.3) == 0.3
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'.*linear, exp, cosine, constant"):
        beta_schedule("quadratic", 0, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        beta_schedule("constant", 0, 10, value=1.5)
    with pytest.raises(ValueError, match="N >= 1"):
        beta_schedule("linear", 0, 0)


# ------------------------------------------------------------------------------------------------ noise
def test_perturbed_noise_keeps_unit_variance_and_mixes_as_specified():
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    for beta in (0.3, 0.6, 0.9):
        out = perturb_noise(z, beta, torch.Generator().manual_seed(2))
        assert out.var().item() == pytest.approx(1.0, abs=0.015)
        assert out.mean().item() == pytest.approx(0.0, abs=0.01)
        corr = torch.corrcoef(torch.stack([z, out]))[0, 1].item()
        assert corr == pytest.approx(math.sqrt(1 - beta**2), abs=0.01)  # the share of z that is kept


def test_beta_zero_is_the_paired_noise_and_beta_one_is_independent_noise():
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(perturb_noise(z, 0.0, torch.Generator().manual_seed(2)), z)
    fresh = perturb_noise(z, 1.0, torch.Generator().manual_seed(2))
    assert abs(torch.corrcoef(torch.stack([z, fresh]))[0, 1].item()) < 0.01  # 4.5 standard errors
    assert fresh.var().item() == pytest.approx(1.0, abs=0.015)
    assert torch.equal(fresh, perturb_noise(z, 1.0, torch.Generator().manual_seed(2)))  # all from the generator
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        perturb_noise(z, -0.1, torch.Generator())


# ------------------------------------------------------------------------------------------------ batches
def anneal_cfg(**changes) -> dict:
    cfg = full_config(DEFAULTS, {"train": {**TINY_TRAIN, "batch_size": 16}})
    cfg["beta"]["schedule"] = "constant"
    cfg["beta"]["value"] = 0.0
    cfg.update(changes)
    return cfg


def test_flips_are_joint_and_per_sample(store_dir):
    store = PairStore(store_dir)
    batch = make_anneal_batch(store, anneal_cfg())(3, torch.Generator().manual_seed(5))
    z, x = store.batch(batch_indices(3, 16, len(store), 0))
    t = batch["t"].view(-1, 1, 1, 1)
    noise = batch["x_t"] - t * batch["target"]  # x_t − t·(x̂ − z̃) = z̃
    data = noise + batch["target"]  # z̃ + (x̂ − z̃) = x̂
    flipped_z = [torch.allclose(noise[i], z[i].flip(-1), atol=1e-5) for i in range(16)]
    kept_z = [torch.allclose(noise[i], z[i], atol=1e-5) for i in range(16)]
    flipped_x = [torch.allclose(data[i], x[i].flip(-1), atol=1e-5) for i in range(16)]
    kept_x = [torch.allclose(data[i], x[i], atol=1e-5) for i in range(16)]
    assert all(a != b for a, b in zip(flipped_z, kept_z)), "each z̃ is either z or its mirror image"
    assert flipped_z == flipped_x and kept_z == kept_x, "z̃ and x̂ are flipped together"
    assert 0 < sum(flipped_z) < 16, "some samples are flipped and others not"
    assert batch["beta"] == 0.0


def test_no_flip_when_disabled_and_batches_are_a_function_of_the_step(store_dir):
    store = PairStore(store_dir)
    make = make_anneal_batch(store, anneal_cfg(hflip=False))
    batch = make(0, torch.Generator().manual_seed(5))
    z, x = store.batch(batch_indices(0, 16, len(store), 0))
    assert torch.allclose(batch["target"], x - z)
    again = make(0, torch.Generator().manual_seed(5))
    assert all(torch.equal(batch[k], again[k]) for k in ("x_t", "t", "target"))


def test_linear_schedule_reaches_plain_reflow_at_n(store_dir):
    store = PairStore(store_dir)
    cfg = anneal_cfg(hflip=False, beta={"schedule": "linear", "steps": 10, "value": 1.0})
    make = make_anneal_batch(store, cfg)
    assert make(0, torch.Generator().manual_seed(0))["beta"] == 1.0
    assert make(5, torch.Generator().manual_seed(0))["beta"] == 0.5
    assert make(10, torch.Generator().manual_seed(0))["beta"] == 0.0


# ------------------------------------------------------------------------------------------------ the stage
def test_anneal_stage_exports_the_ema_student_with_its_provenance(tmp_path):
    teacher_file, teacher = tiny_teacher_file(tmp_path / "teacher.safetensors", seed=0)
    generate_pairs(
        teacher,
        tmp_path / "pairs",
        n=16,
        shape=SHAPE,
        seed=0,
        solver={"method": "euler", "steps": 2},
        shard_size=16,
        batch_size=16,
        progress=False,
    )
    init_file, _ = tiny_teacher_file(tmp_path / "init.safetensors", seed=1)
    cfg = {
        "out": str(tmp_path / "anneal"),
        "pairs": str(tmp_path / "pairs"),
        "teacher": str(teacher_file),
        "model": TINY_UNET,
        "init": str(init_file),
        "train": TINY_TRAIN,
        "sample": {"n": 4, "seed": 0},
    }
    summary = anneal(cfg)
    sidecar, weights = read_model_file(summary["export"])
    assert sidecar["kind"] == "annealed-student" and sidecar["steps"] == 4
    assert sidecar["pairs"]["teacher_hash"] == PairStore(tmp_path / "pairs").manifest["teacher_hash"]
    assert sidecar["config"]["init"] == str(init_file) and sidecar["model"]["nf"] == 8
    # the init file (a UNet with ch_mult [1, 2]) shares the input and time layers, not the rest
    assert 0 < summary["init"]["copied_tensors"] < summary["init"]["model_tensors"]
    assert summary["params"] == sum(w.numel() for w in weights.values())
    assert (tmp_path / "anneal" / "samples").is_dir() and list((tmp_path / "anneal" / "tb").iterdir())
    assert json.loads((tmp_path / "anneal" / "summary.json").read_text())["steps"] == 4

    # the store was made by `teacher`, not by another one
    other_file, _ = tiny_teacher_file(tmp_path / "other.safetensors", seed=2)
    with pytest.raises(PairStoreError, match="made by another teacher"):
        anneal({**cfg, "out": str(tmp_path / "anneal2"), "teacher": str(other_file)})
    # a finished run refuses other settings instead of mixing them
    with pytest.raises(ValueError, match="beta.schedule: run has 'linear', requested 'cosine'"):
        anneal({**cfg, "beta": {"schedule": "cosine"}})


def test_copy_matching_reports_what_it_copied(tmp_path):
    source_file, source = tiny_teacher_file(tmp_path / "src.safetensors", seed=3)
    torch.manual_seed(4)
    target = UNet(1, 8, 8, [1, 2], 1, [], 0.0)
    report = copy_matching(target, source_file)
    assert report["copied_tensors"] == report["model_tensors"] and report["not_copied"] == []
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


def test_bad_stage_inputs_are_named(tmp_path, store_dir):
    base = {"out": str(tmp_path / "a"), "pairs": str(store_dir), "model": TINY_UNET, "train": TINY_TRAIN}
    with pytest.raises(FileNotFoundError, match="no pair store"):
        anneal({**base, "pairs": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="teacher file .*missing.safetensors"):
        anneal({**base, "teacher": str(tmp_path / "missing.safetensors")})
    with pytest.raises(ValueError, match="unknown annealing loss 'lpips-vgg'"):
        anneal({**base, "flow": {"loss": "lpips-vgg"}})
    with pytest.raises(ValueError, match="unknown beta.schedule 'step'"):
        anneal({**base, "beta": {"schedule": "step"}})
    with pytest.raises(ValueError, match="unknown config key 'beta.shedule'"):
        anneal({**base, "beta": {"shedule": "linear"}})


def test_start_run_dir_allows_more_steps_but_not_other_settings(tmp_path):
    cfg = full_config(DEFAULTS, {})
    start_run_dir(tmp_path, cfg)
    start_run_dir(tmp_path, {**cfg, "train": {**cfg["train"], "steps": 99}})
    with pytest.raises(ValueError, match="train.lr"):
        start_run_dir(tmp_path, {**cfg, "train": {**cfg["train"], "lr": 1.0}})


@pytest.mark.skipif(not DOMAIN_WEIGHTS.is_file(), reason="domain net weights not committed yet")
def test_lpips_huber_annealing_loss_compares_the_clean_images_the_student_predicts():
    from slimflow.losses import distance, pseudo_huber

    g = torch.Generator().manual_seed(0)
    z, x, t = (
        torch.randn(4, *SHAPE, generator=g),
        torch.rand(4, *SHAPE, generator=g) * 2 - 1,
        torch.rand(4, generator=g),
    )
    batch = {**flow_matching_batch(z, x, t), "beta": 0.5}
    delta = 0.1 * torch.randn(4, *SHAPE, generator=g)

    def model(x_t, times):  # a student whose velocity is off by delta
        return batch["target"] + delta

    flow = {**DEFAULTS["flow"], "loss": "lpips_huber", "perceptual": "domain", "perceptual_options": {}}
    loss, extra = anneal_loss(flow)(model, batch)
    rest = (1 - t).view(-1, 1, 1, 1)
    expected = t * pseudo_huber(batch["target"] + delta, batch["target"]) + distance("domain")(x + rest * delta, x)
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-4) and extra == {"beta": 0.5}


def test_a_run_written_before_the_lr_schedule_settings_resumes_with_their_defaults(tmp_path):
    cfg = {"train": {"lr": 1e-3, "steps": 10}}
    start_run_dir(tmp_path, cfg)  # an old run: its config.yaml has no lr_schedule / min_lr
    start_run_dir(tmp_path, {"train": {**cfg["train"], "lr_schedule": "constant", "min_lr": 0.0}})
    with pytest.raises(ValueError, match="train.lr_schedule: run has None, requested 'cosine'"):
        start_run_dir(tmp_path / "other", cfg) or start_run_dir(
            tmp_path / "other", {"train": {**cfg["train"], "lr_schedule": "cosine", "min_lr": 0.0}}
        )
