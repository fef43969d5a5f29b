"""Flow-guided distillation: the 2-step target against closed forms, the two variants, gradients, the stage."""

import pytest
import torch
from torch import nn

from slimflow.checkpoint import read_model_file, save_model
from slimflow.losses import l2
from slimflow.pairs import PairStore, PairStoreError, generate_pairs
from slimflow.stages.anneal import anneal
from slimflow.stages.distill import (
    DEFAULTS,
    check_loss_config,
    distill,
    distill_job,
    distill_loss,
    distill_terms,
    make_distill_batch,
    stage_keys,
    two_step_target,
)
from slimflow.stages.prune import prune_student
from teachers.unet import UNet
from teachers.zoo import build_model

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


class LinearField(nn.Module):
    """v(x, t) = w·x: its velocities, Euler steps and gradients have closed forms."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x, t):
        assert t.shape == (x.shape[0],)
        return self.w * x


def batch_of(n: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "z": torch.randn(n, 1, 2, 2, generator=g),
        "x_hat": torch.randn(n, 1, 2, 2, generator=g),
        "e": torch.randn(n, 1, 2, 2, generator=g),
        "t2": 0.2 + 0.6 * torch.rand(n, generator=g),
    }


def test_two_step_target_closed_form():
    guide = LinearField(-1.0).requires_grad_(False)
    e, s1, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0.2, 0.4, 0.5, 0.8])
    tb = t[:, None]
    # x_t = e + t·s₁; one Euler step of dx/dt = −x over 1 − t: y = x_t − (1 − t)·x_t = t·x_t
    assert torch.allclose(two_step_target(guide, e, s1, t), tb * (e + tb * s1))


def test_variants_differ_exactly_in_the_first_step_velocity():
    student, guide = LinearField(2.0), LinearField(-1.0).requires_grad_(False)
    batch = batch_of()
    z, e, t = batch["z"], batch["e"], batch["t2"].view(-1, 1, 1, 1)
    ref = distill_terms(student, guide, batch, "reference")
    paper = distill_terms(student, guide, batch, "paper")
    for terms in (ref, paper):  # the student's images are the same in both variants
        assert torch.allclose(terms["one_step"], 3 * z) and torch.allclose(terms["two_step"], 3 * e)
        assert torch.equal(terms["pair_image"], batch["x_hat"])
    # reference: first step with the student's ŝ = 2e, then the guide: y = t·(e + 2t·e)
    assert torch.allclose(ref["two_step_target"], t * (1 + 2 * t) * e)
    # paper: first step with the guide's −e: y = t·(e − t·e)
    assert torch.allclose(paper["two_step_target"], t * (1 - t) * e)
    assert torch.allclose(ref["two_step_target"], two_step_target(guide, e, student(e, batch["t2"]), batch["t2"]))
    assert torch.allclose(paper["two_step_target"], two_step_target(guide, e, guide(e, batch["t2"]), batch["t2"]))


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_student_runs_at_the_one_step_time_and_the_guide_at_t_prime(variant):
    calls = {"student": [], "guide": []}

    def field(name):
        def v(x, t):
            calls[name].append(t.clone())
            return -x

        return v

    batch = batch_of()
    distill_terms(field("student"), field("guide"), batch, variant, t0=1e-3)
    assert len(calls["student"]) == 1 and torch.all(calls["student"][0] == 1e-3)
    guide_times = [batch["t2"]] if variant == "reference" else [torch.full((5,), 1e-3), batch["t2"]]
    assert len(calls["guide"]) == len(guide_times)
    assert all(torch.equal(a, b) for a, b in zip(calls["guide"], guide_times))


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_l2_loss_and_gradient_match_closed_forms_and_only_the_student_learns(variant):
    student, guide = LinearField(2.0), LinearField(-1.0).requires_grad_(False)
    batch = batch_of()
    z, x, e, t = batch["z"], batch["x_hat"], batch["e"], batch["t2"].view(-1, 1, 1, 1)
    cfg = {"variant": variant, "one_step_time": 0.0, "w_distill": 0.7, "w_2step": 1.3}
    loss, parts = distill_loss(guide, l2, cfg)(student, batch)
    y = t * (1 + 2 * t) * e if variant == "reference" else t * (1 - t) * e
    one, two = (3 * z - x).square().mean(), (3 * e - y).square().mean()
    assert parts["distill"].item() == pytest.approx(one.item(), rel=1e-5)
    assert parts["two_step"].item() == pytest.approx(two.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * one.item() + 1.3 * two.item(), rel=1e-5)
    loss.backward()
    # y is a constant: d/dw of 0.7·mean((w·z + z − x̂)²) + 1.3·mean((e + w·e − y)²) at w = 2
    grad = 0.7 * (2 * (3 * z - x) * z).mean() + 1.3 * (2 * (3 * e - y) * e).mean()
    assert student.w.grad.item() == pytest.approx(grad.item(), rel=1e-5)
    assert guide.w.grad is None


def test_zero_two_step_weight_is_plain_distillation_without_calling_the_guide():
    student = LinearField(2.0)

    def guide(x, t):
        raise AssertionError("the guide must not run when w_2step = 0")

    batch = batch_of()
    cfg = {"variant": "reference", "one_step_time": 0.0, "w_distill": 0.7, "w_2step": 0.0}
    loss, parts = distill_loss(guide, l2, cfg)(student, batch)
    one = (3 * batch["z"] - batch["x_hat"]).square().mean()
    assert set(parts) == {"distill"} and loss.item() == pytest.approx(0.7 * one.item(), rel=1e-5)


def test_batches_draw_fresh_noise_and_times_from_the_generator(tmp_path):
    generate_pairs(
        lambda x, t: 1.0 - x,
        tmp_path,
        n=16,
        shape=SHAPE,
        seed=0,
        solver={"method": "euler", "steps": 2},
        shard_size=16,
        batch_size=16,
        teacher_hash="field",
        progress=False,
    )
    store = PairStore(tmp_path)
    make = make_distill_batch(store, {"batch_size": 16, "seed": 0}, {"t_min": 0.2, "t_max": 0.8})
    batch = make(0, torch.Generator().manual_seed(1))
    assert batch["t2"].min() >= 0.2 and batch["t2"].max() <= 0.8 and batch["t2"].std() > 0.1
    assert abs(torch.corrcoef(torch.stack([batch["e"].flatten(), batch["z"].flatten()]))[0, 1]) < 0.15
    again = make(0, torch.Generator().manual_seed(1))
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    other = make(0, torch.Generator().manual_seed(2))
    assert torch.equal(other["z"], batch["z"]) and not torch.equal(other["e"], batch["e"])


def test_loss_settings_are_checked():
    ok = dict(DEFAULTS["loss"])
    check_loss_config(ok)
    with pytest.raises(ValueError, match="lpips_huber.*does not apply.*l2.*domain"):
        check_loss_config({**ok, "distance": "lpips_huber"})
    with pytest.raises(ValueError, match="unknown distillation distance 'ssim'.*pseudo_huber.*lpips-vgg"):
        check_loss_config({**ok, "distance": "ssim"})
    with pytest.raises(ValueError, match="unknown loss.variant 'both'"):
        check_loss_config({**ok, "variant": "both"})
    with pytest.raises(ValueError, match="t_min < t_max"):
        check_loss_config({**ok, "t_min": 0.8, "t_max": 0.2})


# ------------------------------------------------------------------------------------------------ the stage
def tiny_teacher_file(path, seed: int):
    torch.manual_seed(seed)
    teacher = UNet(1, 8, 8, [1, 2], 1, [], 0.0)
    return save_model(path, teacher, {"model": teacher.config, "kind": "test-teacher"}), teacher


@pytest.fixture(scope="module")
def annealed(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    _, teacher = tiny_teacher_file(root / "teacher.safetensors", seed=0)
    return root, pairs_then_anneal(teacher, root, SHAPE, solver_steps=2, train=TINY_TRAIN)


def pairs_then_anneal(teacher, root, shape, solver_steps: int, train: dict) -> str:
    """16 pairs of `teacher` in root/pairs and a tiny student annealed on them; returns the student's file."""
    solver = {"method": "euler", "steps": solver_steps}
    generate_pairs(teacher, root / "pairs", 16, shape, 0, solver, shard_size=16, batch_size=16, progress=False)
    cfg = {"out": str(root / "anneal"), "pairs": str(root / "pairs"), "model": TINY_UNET, "train": train}
    return anneal({**cfg, "sample": {"n": 4, "seed": 0}})["export"]


def test_distill_stage_starts_from_the_annealed_model_and_exports_the_student(annealed):
    root, student_file = annealed
    cfg = {
        "out": str(root / "distill"),
        "pairs": str(root / "pairs"),
        "teacher": str(root / "teacher.safetensors"),
        "student": student_file,
        "loss": {"variant": "paper", "w_2step": 0.5},
        "train": TINY_TRAIN,
        "sample": {"n": 4, "seed": 0},
    }
    summary = distill(cfg)
    sidecar, weights = read_model_file(summary["export"])
    start_sidecar, start = read_model_file(student_file)
    assert sidecar["kind"] == "distilled-student" and sidecar["guide"]["kind"] == "annealed-student"
    assert sidecar["model"] == start_sidecar["model"] and sidecar["one_step_time"] == 0.0
    assert sidecar["config"]["loss"]["variant"] == "paper" and summary["steps"] == 4
    assert any(not torch.equal(weights[k], start[k]) for k in start), "the student trained"
    assert set(summary["final"]) >= {"train/loss", "train/distill", "train/two_step"}


def test_distill_refuses_bad_inputs(annealed, tmp_path):
    root, student_file = annealed
    base = {"out": str(tmp_path / "d"), "pairs": str(root / "pairs"), "student": student_file, "train": TINY_TRAIN}
    with pytest.raises(FileNotFoundError, match="annealed model .*nope.safetensors"):
        distill({**base, "student": str(tmp_path / "nope.safetensors")})
    with pytest.raises(ValueError, match="unknown distillation distance 'lpips-squeeze'"):
        distill({**base, "loss": {"distance": "lpips-squeeze"}})
    # pairs of another teacher than the one the annealed student learned from
    _, other = tiny_teacher_file(tmp_path / "other.safetensors", seed=5)
    generate_pairs(
        other,
        tmp_path / "other_pairs",
        n=16,
        shape=SHAPE,
        seed=0,
        solver={"method": "euler", "steps": 2},
        shard_size=16,
        batch_size=16,
        progress=False,
    )
    with pytest.raises(PairStoreError, match="made by another teacher"):
        distill({**base, "pairs": str(tmp_path / "other_pairs")})


def test_a_student_distilled_at_t0_is_sampled_benchmarked_and_exported_at_t0(tmp_path):
    """loss.one_step_time = 0.3: the model file records it, and sample, bench and export all evaluate z + v(z, 0.3)."""
    from slimflow.config import load_config
    from slimflow.flow import noise_for
    from slimflow.images import save_grid
    from slimflow.sample import sample
    from slimflow.stages import bench as bench_stage
    from slimflow.stages.export import export_model
    from teachers.zoo import load_model

    torch.manual_seed(0)
    teacher = UNet(1, 32, 8, [1, 2], 1, [], 0.0)
    annealed = pairs_then_anneal(teacher, tmp_path, (1, 32, 32), solver_steps=1, train={**TINY_TRAIN, "steps": 2})
    distilled = distill(
        {
            "out": str(tmp_path / "distill"),
            "pairs": str(tmp_path / "pairs"),
            "student": annealed,
            "loss": {"one_step_time": 0.3, "t_min": 0.4},
            "train": {**TINY_TRAIN, "steps": 2},
            "sample": {"n": 4, "seed": 0},
        }
    )["export"]
    sidecar = read_model_file(distilled)[0]
    assert sidecar["one_step_time"] == 0.3 and load_model(distilled).one_step_time == 0.3
    # two steps leave v nearly independent of t; random weights (same file, same sidecar) make t matter
    model = load_model(distilled)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    save_model(distilled, model, {k: v for k, v in sidecar.items() if k not in ("format", "version", "sha256")})
    model = load_model(distilled)

    z = noise_for(range(8), 0, (1, 32, 32))
    with torch.no_grad():
        at_t0 = z + model(z, torch.full((8,), 0.3))
        at_zero = z + model(z, torch.zeros(8))
    assert (at_t0 - at_zero).abs().max() > 1e-3  # the two times give different images: the check can fail
    images, nfe = sample(model, 8, method="euler", steps=1, seed=0)
    assert nfe == 1 and torch.allclose(images, at_t0, atol=1e-6)

    report = export_model(distilled, tmp_path / "export", formats=("torch_export",), repeats=1, warmup=0)
    program = torch.export.load(report["torch_export"]["file"]).module()
    assert report["one_step_time"] == 0.3 and torch.allclose(program(z), at_t0, atol=1e-5)

    cfg = load_config(bench_stage.DEFAULTS)
    cfg.update(out=str(tmp_path / "bench"), device="cpu", grid=8, entries=[{"name": "student", "model": distilled}])
    cfg["reference"]["n"] = 64
    cfg["metrics"].update(
        n_samples=8, batch_size=8, kid_subsets=2, kid_subset_size=8, cache_dir=str(tmp_path / "cache")
    )
    cfg["cost"].update(batch_sizes=[1], warmup=0, repeats=1)
    bench_stage.bench(cfg, command="pytest")
    expected = save_grid(images, tmp_path / "expected.png")
    assert (tmp_path / "bench" / "samples" / "student.png").read_bytes() == expected.read_bytes()


def test_the_guide_and_init_keys_stay_out_of_the_run_key_at_their_defaults(annealed, tmp_path):
    """A run made before `guide` and `init` existed is still current: at their defaults they are not recorded."""
    root, student_file = annealed
    cfg = {**DEFAULTS, "out": str(tmp_path / "d"), "pairs": str(root / "pairs"), "student": student_file}
    assert not {"guide", "init"} & set(stage_keys(cfg))
    assert not {"guide", "init", "guide_sha256"} & set(distill_job(cfg).run_config)
    teacher = str(root / "teacher.safetensors")
    assert distill_job({**cfg, "guide": teacher, "init": "scratch"}).run_config["guide"] == teacher


def test_another_guide_and_a_scratch_start(annealed, tmp_path):
    """guide= changes the two-step target (and is recorded); init scratch keeps only the architecture: two files of
    one architecture with different weights give the same student, and the file's weights give another."""
    root, student_file = annealed
    teacher = str(root / "teacher.safetensors")
    sidecar, _ = read_model_file(student_file)
    torch.manual_seed(7)
    other = build_model(dict(sidecar["model"]))
    other_file = save_model(tmp_path / "other.safetensors", other, {"model": sidecar["model"], "kind": "test"})
    base = {"pairs": str(root / "pairs"), "train": TINY_TRAIN, "sample": {"n": 4, "seed": 0}}

    def run(name: str, **cfg) -> dict:
        summary = distill({**base, "out": str(tmp_path / name), **cfg})
        return read_model_file(summary["export"])

    own_side, own = run("own", student=student_file)
    guided_side, guided = run("guided", student=student_file, guide=teacher)
    assert guided_side["guide"]["file"] == teacher and own_side["guide"]["file"] == student_file
    assert any(not torch.equal(own[k], guided[k]) for k in own), "the teacher as guide changes the training"

    side_a, a = run("scratch-a", student=student_file, guide=teacher, init="scratch")
    _, b = run("scratch-b", student=str(other_file), guide=teacher, init="scratch")
    assert side_a["init"] == "scratch" and side_a["model"] == sidecar["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "a scratch start does not depend on the file's weights"
    assert any(not torch.equal(a[k], guided[k]) for k in a), "and differs from starting at the file's weights"


def test_a_bad_guide_or_init_stops_before_any_training(annealed, tmp_path):
    root, student_file = annealed
    base = {"out": str(tmp_path / "d"), "pairs": str(root / "pairs"), "student": student_file, "train": TINY_TRAIN}
    with pytest.raises(ValueError, match="unknown init 'random'; choose one of weights, scratch"):
        distill({**base, "init": "random"})
    with pytest.raises(FileNotFoundError, match="guide .*nope.safetensors"):
        distill({**base, "guide": str(tmp_path / "nope.safetensors")})
    torch.manual_seed(0)
    wide = UNet(1, 16, 8, [1, 2], 1, [], 0.0)  # 16 px images: not the student's 8 px
    wide_file = save_model(tmp_path / "wide.safetensors", wide, {"model": wide.config, "kind": "test-teacher"})
    with pytest.raises(ValueError, match=r"guide .*wide.safetensors works on .*\(1, 16, 0\).*\(1, 8, 0\)"):
        distill({**base, "guide": str(wide_file)})
    pruned = prune_student(
        {
            "out": str(tmp_path / "pruned"),
            "student": student_file,
            "prune": {"ratio": 0.5},
            "recover": {"mode": "none"},
            "compare": {"n": 4, "seed": 0},
        }
    )
    with pytest.raises(ValueError, match="init scratch .*is a pruned network"):
        distill({**base, "student": pruned["prune"]["file"], "init": "scratch"})
    assert not list((tmp_path / "d").glob("*")), "no run was started"
