"""Class-conditional flows (issue 15): the UNet's label embedding, seeded labels, the teacher stage with labels and
label dropout, and the unconditional path left exactly as it was."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimflow.checkpoint import read_model_file
from slimflow.flow import balanced_labels, labels_for, noise_for
from slimflow.sample import conditioned, sample
from slimflow.stages.teacher import teacher_job, train_teacher
from teachers.unet import NO_LABEL, PRESETS, build_unet
from teachers.zoo import load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {"preset": None, "nf": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def tiny_unet(num_classes: int = 0, resolution: int = 8) -> torch.nn.Module:
    cfg = {k: v for k, v in TINY.items() if k != "preset"}
    extra = {"num_classes": num_classes} if num_classes else {}
    return build_unet({**cfg, "in_channels": 1, "resolution": resolution, **extra})


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random (the zero-initialised output layer would hide what the labels do)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


# ------------------------------------------------------------------------------------------- the UNet
def test_unconditional_teacher_file_loads_with_the_same_keys_and_outputs_as_before():
    """The committed unconditional teacher: same state-dict keys, config without num_classes, and outputs equal to
    those of the UNet before conditioning existed (fixture written by that code). Equal up to float32 rounding, not
    bit for bit: another CPU's convolution kernels sum in another order (an AMD EPYC differs in 91 % of the values,
    by at most 2.4e-6), while a changed network would differ by orders of magnitude more."""
    teacher = load_model(ROOT / "teachers/weights/fmnist_teacher.safetensors")
    assert teacher.num_classes == 0 and "num_classes" not in teacher.config and teacher.map_label is None
    assert set(teacher.state_dict()) == set(load_file(ROOT / "teachers/weights/fmnist_teacher.safetensors"))
    z, t = noise_for(range(4), 0, (1, 32, 32)), torch.tensor([0.0, 0.3, 0.7, 1.0])
    expected = load_file(ROOT / "tests/fixtures/fmnist_teacher_velocity.safetensors")["velocity"]
    torch.testing.assert_close(teacher(z, t), expected, rtol=0, atol=1e-5)


def test_unconditional_init_is_unchanged_by_the_conditional_code():
    torch.manual_seed(3)
    plain = build_unet(PRESETS["fmnist-student-s"])
    torch.manual_seed(3)
    cond = build_unet({**PRESETS["fmnist-student-s"], "num_classes": 10})
    assert set(cond.state_dict()) - set(plain.state_dict()) == {"map_label.weight", "map_label.bias"}
    for name, tensor in plain.state_dict().items():  # map_label is built last: the shared weights are the same
        assert torch.equal(tensor, cond.state_dict()[name]), name
    assert cond.config == {**plain.config, "num_classes": 10}


def test_labels_change_the_velocity_and_no_label_is_the_zero_one_hot():
    model = randomised(tiny_unet(num_classes=3))
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.4)
    v = [model(x, t, torch.full((3,), c)) for c in range(3)]
    assert not torch.allclose(v[0], v[1]) and not torch.allclose(v[1], v[2])
    assert torch.equal(model(x, t, 2), v[2])  # one int is every sample's label
    with torch.no_grad():
        model.map_label.bias.zero_()
    # with a zero bias, "no label" adds nothing to the time embedding
    plain = tiny_unet()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("map_label")})
    assert torch.allclose(model(x, t, torch.full((3,), NO_LABEL)), plain(x, t), atol=1e-6)


@pytest.mark.parametrize(
    ("num_classes", "labels", "message"),
    [
        (3, None, "class-conditional .3 classes.: call it as model.x, t, labels."),
        (3, torch.tensor([0, 3, 1]), r"label 3 is outside \[0, 3\)"),
        (3, torch.tensor([0, -2, 1]), r"label -2 is outside \[0, 3\)"),
        (3, torch.tensor([0.0, 1.0, 2.0]), "labels must be integers"),
        (3, torch.tensor([0, 1]), r"labels must have shape \(3,\)"),
        (0, torch.tensor([0, 1, 2]), "labels were given to an unconditional model"),
    ],
)
def test_bad_labels_are_clear_errors(num_classes, labels, message):
    model = tiny_unet(num_classes)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(3, 1, 8, 8), 0.5, labels)


def test_bad_num_classes_is_refused():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            tiny_unet(num_classes=bad)


# ------------------------------------------------------------------------------------------- labels
def test_labels_are_regenerated_bit_exactly_from_seed_and_index():
    whole = labels_for(range(1000), 7, 10)
    assert whole.dtype == torch.long and whole.shape == (1000,)
    assert torch.equal(labels_for([999, 3, 500], 7, 10), whole[[999, 3, 500]])  # any order, any subset
    assert torch.equal(labels_for(torch.arange(500, 1000), 7, 10), whole[500:])
    assert not torch.equal(labels_for(range(1000), 8, 10), whole)  # another seed, other labels
    counts = torch.bincount(whole, minlength=10)
    assert counts.min() > 60 and counts.max() < 140  # every class, about 100 each
    assert int(labels_for([0], 7, 10)) == int(whole[0])
    # fixed values: the scheme is part of the pair-store format (changing it would change stored pairs' labels)
    assert labels_for(range(8), 0, 10).tolist() == LABELS_SEED0


LABELS_SEED0 = [5, 3, 3, 1, 6, 6, 0, 0]


def test_balanced_labels_and_bad_class_counts():
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert balanced_labels(torch.tensor([4, 5]), 3).tolist() == [1, 2]
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        labels_for(range(3), 0, 0)


# ------------------------------------------------------------------------------------------- sampling
def test_sampling_labels_and_guidance():
    model = randomised(tiny_unet(num_classes=3))
    model.sample_shape = (1, 8, 8)
    balanced, _ = sample(model, 6, method="euler", steps=2, seed=1)
    explicit, _ = sample(model, 6, method="euler", steps=2, seed=1, labels=balanced_labels(6, 3))
    assert torch.equal(balanced, explicit)
    one_class, _ = sample(model, 6, method="euler", steps=2, seed=1, labels=2)
    assert torch.equal(one_class[2::3], balanced[2::3]) and not torch.allclose(one_class[:2], balanced[:2])
    from slimflow.api import generate

    assert torch.equal(generate(model, 6, steps=2, seed=1), balanced)
    assert torch.equal(generate(model, 6, steps=2, seed=1, labels=2), one_class)
    # w = 1 is plain conditioning; w = 0 is the "no label" model
    guided1, nfe = sample(model, 6, method="euler", steps=2, seed=1, guidance=1.0)
    assert torch.equal(guided1, balanced) and nfe == 2
    guided0, _ = sample(model, 6, method="euler", steps=2, seed=1, guidance=0.0)
    no_label, _ = sample(model, 6, method="euler", steps=2, seed=1, labels=torch.full((6,), NO_LABEL))
    assert torch.allclose(guided0, no_label, atol=1e-6)
    z, t, lab = torch.randn(2, 1, 8, 8), torch.full((2,), 0.3), torch.tensor([0, 1])
    v = conditioned(model, lab, 2.5)(z, t)
    expected = model(z, t, torch.full((2,), NO_LABEL)) + 2.5 * (model(z, t, lab) - model(z, t, torch.full((2,), -1)))
    assert torch.allclose(v, expected, atol=1e-5)
    with pytest.raises(ValueError, match="labels must be a class, 'balanced'"):
        sample(model, 6, labels="every")
    with pytest.raises(ValueError, match=r"label 5 is outside \[0, 3\)"):
        sample(model, 6, labels=5)
    plain = tiny_unet()
    plain.sample_shape = (1, 8, 8)
    with pytest.raises(ValueError, match="labels were given to an unconditional model"):
        sample(plain, 2, labels=1)
    with pytest.raises(ValueError, match="guidance .scale 2.0. needs a class-conditional model"):
        sample(plain, 2, guidance=2.0)


# ------------------------------------------------------------------------------------------- teacher stage
def teacher_config(out, model=None, flow=None, **train):
    return {
        "out": str(out),
        "data": {"name": "digits", "image_size": 8},
        "model": {**TINY, **(model or {})},
        "flow": flow or {},
        "train": {"steps": 4, "batch_size": 8, "warmup": 2, "log_every": 2, "ckpt_every": 2, **train},
        "sample": {"n": 4, "steps": 2},
    }


def test_unconditional_teacher_run_config_has_no_new_setting():
    from slimflow.stages.runner import full_config
    from slimflow.stages.teacher import DEFAULTS

    job = teacher_job(full_config(DEFAULTS, teacher_config("unused")))
    assert "label_dropout" not in job.run_config["flow"] and "num_classes" not in job.run_config["model"]
    assert "label_dropout" not in job.meta


def test_conditional_teacher_trains_with_labels_resumes_exactly_and_exports(tmp_path):
    cond = {"num_classes": 10}
    whole = train_teacher(teacher_config(tmp_path / "whole", cond, {"label_dropout": 0.25}))
    first = train_teacher(teacher_config(tmp_path / "split", cond, {"label_dropout": 0.25}, steps=2))
    resumed = train_teacher(teacher_config(tmp_path / "split", cond, {"label_dropout": 0.25}))
    assert first["status"] == "ran" and resumed["status"] == "resumed" and resumed["steps"] == 4
    a, b = read_model_file(whole["export"])[1], read_model_file(resumed["export"])[1]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # resumed == uninterrupted
    sidecar, _ = read_model_file(whole["export"])
    assert sidecar["model"]["num_classes"] == 10 and sidecar["label_dropout"] == 0.25
    teacher = load_model(whole["export"])
    assert teacher.num_classes == 10
    with pytest.raises(ValueError, match="class-conditional"):
        teacher(torch.randn(2, 1, 8, 8), 0.5)
    # the labels matter: the same run with dropout 0 trains other weights
    other = train_teacher(teacher_config(tmp_path / "nodrop", cond, {"label_dropout": 0.0}))
    c = read_model_file(other["export"])[1]
    assert not torch.equal(a["map_label.weight"], c["map_label.weight"])


def test_teacher_label_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="flow.label_dropout = 0.1 needs a class-conditional model"):
        train_teacher(teacher_config(tmp_path / "a", flow={"label_dropout": 0.1}))
    with pytest.raises(ValueError, match=r"flow.label_dropout must be a number in \[0, 1\)"):
        train_teacher(teacher_config(tmp_path / "b", {"num_classes": 10}, {"label_dropout": 1.0}))
    with pytest.raises(ValueError, match=r"labels in \[0, 10\), more than model.num_classes = 4"):
        train_teacher(teacher_config(tmp_path / "c", {"num_classes": 4}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_conditional_teacher_config_file_is_the_unconditional_one_plus_labels():
    from slimflow.config import yaml_load

    cond = yaml_load((ROOT / "configs/teacher/fmnist-cond.yaml").read_text())
    plain = yaml_load((ROOT / "configs/teacher/fmnist.yaml").read_text())
    assert cond["model"] == {**plain["model"], "num_classes": 10}
    assert cond["flow"] == {**plain["flow"], "label_dropout": 0.1}
    assert json.dumps(cond["data"]) == json.dumps(plain["data"])


# ------------------------------------------------------------------------------------------- pairs → anneal → distill
def teacher_file(tmp_path, num_classes: int = 3):
    from slimflow.checkpoint import save_model

    torch.manual_seed(5)
    model = tiny_unet(num_classes)
    with torch.no_grad():  # a teacher whose labels matter: random label embedding and output layer
        for name, p in model.named_parameters():
            if name.startswith("map_label") or name.startswith(f"all_modules.{len(model.all_modules) - 1}"):
                p.normal_(0.0, 0.3)
    return save_model(tmp_path / "teacher.safetensors", model, {"model": model.config, "kind": "test-teacher"})


def make_store(tmp_path, teacher, guidance=1.0, name="pairs", n=24):
    from slimflow.stages.pairs import generate_pairs_from_config

    cfg = {"out": str(tmp_path / name), "teacher": str(teacher), "n": n, "seed": 3, "shard_size": 12}
    cfg.update(batch_size=12, solver={"method": "euler", "steps": 2}, guidance=guidance, device="cpu")
    return generate_pairs_from_config(cfg)


def test_conditional_pairs_record_labels_from_the_seed_and_the_guidance(tmp_path):
    from slimflow.pairs import PairStore, pairs_record
    from slimflow.sample import sample

    teacher_path = teacher_file(tmp_path)
    manifest = make_store(tmp_path, teacher_path, guidance=2.0)
    assert manifest["num_classes"] == 3 and manifest["guidance"] == 2.0 and "label_scheme" in manifest
    store = PairStore(tmp_path / "pairs")
    assert torch.equal(store.labels(range(24)), labels_for(range(24), 3, 3))
    from safetensors.torch import load_file as load

    assert set(load(tmp_path / "pairs" / "shard_00000.safetensors")) == {"index", "image"}  # no stored labels
    # each pair is the teacher's guided ODE under that pair's label
    teacher = load_model(teacher_path)
    images, _ = sample(teacher, 24, method="euler", steps=2, seed=3, labels=store.labels(range(24)), guidance=2.0)
    assert torch.allclose(store.get(range(24))[1], images, atol=2e-3)  # float16 storage
    assert pairs_record(store)["num_classes"] == 3
    # another guidance is another store
    from slimflow.pairs import PairStoreError

    with pytest.raises(PairStoreError, match="guidance: store has 2.0, requested 1.0"):
        make_store(tmp_path, teacher_path, guidance=1.0)


def test_unconditional_pair_store_settings_are_unchanged(tmp_path):
    from slimflow.checkpoint import save_model
    from slimflow.pairs import SETTINGS_KEYS, PairStore, pairs_record

    model = tiny_unet()
    teacher = save_model(tmp_path / "plain.safetensors", model, {"model": model.config, "kind": "test-teacher"})
    manifest = make_store(tmp_path, teacher, name="plain")
    assert not {"num_classes", "guidance", "label_scheme"} & set(manifest)
    store = PairStore(tmp_path / "plain")
    assert store.labels(range(3)) is None and "num_classes" not in pairs_record(store)
    assert set(SETTINGS_KEYS) <= set(manifest)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        make_store(tmp_path, teacher, name="plain2", guidance=3.0)


def student_cfgs(tmp_path, pairs, steps=4):
    train = {"steps": steps, "batch_size": 6, "warmup": 1, "log_every": 2, "ckpt_every": 2, "lr": 1e-3}
    anneal_cfg = {
        "out": str(tmp_path / "anneal"),
        "pairs": str(pairs),
        "model": {**TINY, "nf": 8},
        "train": train,
        "sample": {"n": 4},
    }
    distill_cfg = {
        "out": str(tmp_path / "distill"),
        "pairs": str(pairs),
        "student": str(tmp_path / "anneal" / "annealed_ema.safetensors"),
        "train": train,
        "sample": {"n": 4},
    }
    return anneal_cfg, distill_cfg


def test_conditional_anneal_and_distill_train_on_the_pairs_labels_and_resume_exactly(tmp_path):
    from slimflow.stages.anneal import anneal
    from slimflow.stages.distill import distill

    teacher_path = teacher_file(tmp_path)
    make_store(tmp_path, teacher_path)
    anneal_cfg, distill_cfg = student_cfgs(tmp_path, tmp_path / "pairs")
    annealed = anneal(anneal_cfg)
    student = load_model(annealed["export"])
    assert student.num_classes == 3 and read_model_file(annealed["export"])[0]["model"]["num_classes"] == 3
    distilled = distill({**distill_cfg, "train": {**distill_cfg["train"], "eval_every": 2, "eval_n": 6}})
    assert [v for k, v in distilled["eval"].items() if k.endswith("one_step_l2_to_teacher")][0] > 0
    one_step = load_model(distilled["export"])
    assert one_step.num_classes == 3
    # resumed == uninterrupted (distillation draws fresh labels for the 2-step term from the step's generator)
    part = {**distill_cfg, "out": str(tmp_path / "d2"), "train": {**distill_cfg["train"], "steps": 2}}
    distill(part)
    resumed = distill({**part, "train": distill_cfg["train"]})
    assert resumed["status"] == "resumed"
    a, b = read_model_file(distilled["export"])[1], read_model_file(resumed["export"])[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the labels reach the student: the annealed model trained on pairs with other labels differs
    imgs = [sample(one_step, 3, labels=c)[0] for c in range(3)]
    assert not torch.equal(imgs[0], imgs[1])


def test_distill_batch_draws_fresh_labels_for_the_two_step_term(tmp_path):
    from slimflow.engine import step_generator
    from slimflow.pairs import PairStore
    from slimflow.stages.distill import make_distill_batch

    make_store(tmp_path, teacher_file(tmp_path))
    store = PairStore(tmp_path / "pairs")
    make = make_distill_batch(store, {"batch_size": 12, "seed": 0}, {"t_min": 0.2, "t_max": 0.8})
    batch = make(0, step_generator(0, 0))
    again = make(0, step_generator(0, 0))
    assert torch.equal(batch["e_labels"], again["e_labels"]) and torch.equal(batch["labels"], again["labels"])
    index = torch.tensor([i for i in range(24)])
    assert set(batch["labels"].tolist()) <= set(store.labels(index).tolist())
    assert not torch.equal(batch["e_labels"], batch["labels"])
    assert batch["e_labels"].min() >= 0 and batch["e_labels"].max() < 3


def test_student_and_store_classes_must_match(tmp_path):
    from slimflow.stages.anneal import anneal

    make_store(tmp_path, teacher_file(tmp_path))
    anneal_cfg, _ = student_cfgs(tmp_path, tmp_path / "pairs")
    with pytest.raises(ValueError, match=r"class-conditional \(5 classes\) but the pair store .* \(3 classes\)"):
        anneal({**anneal_cfg, "model": {**TINY, "num_classes": 5}})


# ------------------------------------------------------------------------------------------- prune
def cond_one_step_student(tmp_path, num_classes: int = 3) -> Path:
    """A random class-conditional one-step student at the pairs' resolution (8) and classes."""
    from slimflow.checkpoint import save_model

    torch.manual_seed(1)
    model = randomised(
        build_unet(
            {
                **{k: v for k, v in TINY.items() if k != "preset"},
                "nf": 16,
                "in_channels": 1,
                "resolution": 8,
                "num_classes": num_classes,
            }
        )
    )
    meta = {"model": model.config, "kind": "distilled-student", "one_step_time": 0.0}
    return save_model(tmp_path / "cond_student.safetensors", model, meta)


def test_a_conditional_student_prunes_with_its_labels_and_recovers_on_the_pairs_labels(tmp_path):
    from slimflow.stages.prune import pairs_flow_batch, prune_student

    make_store(tmp_path, teacher_file(tmp_path))
    student_path = cond_one_step_student(tmp_path)
    train = {"steps": 4, "batch_size": 6, "warmup": 1, "log_every": 2, "ckpt_every": 2, "ema": {"kind": "none"}}
    cfg = {
        "out": str(tmp_path / "pruned"),
        "student": str(student_path),
        "pairs": str(tmp_path / "pairs"),
        "prune": {"importance": "taylor", "macs_fraction": 0.5, "taylor": {"batches": 2, "batch_size": 4}},
        "recover": {"mode": "flow", "train": train},
        "compare": {"n": 6, "seed": 0},
    }
    summary = prune_student(cfg)
    assert summary["recover"]["status"] == "ran"
    assert summary["models"]["pruned"]["macs"] <= 0.5 * summary["models"]["unpruned"]["macs"]
    # the label embedding keeps its width: it is added to the fixed-width sinusoidal time embedding
    pruned = load_model(tmp_path / "pruned" / "pruned.safetensors")
    assert pruned.num_classes == 3 and pruned.map_label.weight.shape == load_model(student_path).map_label.weight.shape
    assert pruned.all_modules[0].in_features == pruned.map_label.out_features
    assert (
        read_model_file(tmp_path / "pruned" / "pruned.safetensors")[0]["pruning"]["example_inputs"][2]["dtype"]
        == "int64"
    )
    recovered = load_model(tmp_path / "pruned" / "recovered_ema.safetensors")
    images = [sample(recovered, 3, labels=c)[0] for c in range(3)]
    assert not torch.equal(images[0], images[1])  # the labels still reach the pruned, recovered student
    # recovery's flow batches carry the pairs' labels, regenerated from their indices
    from slimflow.pairs import PairStore

    store = PairStore(tmp_path / "pairs")
    batch = pairs_flow_batch(store, torch.tensor([5, 0, 7]), torch.full((3,), 0.5))
    assert torch.equal(batch["labels"], labels_for([5, 0, 7], 3, 3))
    # one-step recovery on fresh noise draws fresh labels; its run resumes like any other
    one_step = {
        **cfg,
        "out": str(tmp_path / "one_step"),
        "recover": {"mode": "one_step", "distance": "l2", "train": train},
    }
    assert prune_student({**one_step, "recover": {**one_step["recover"], "train": {**train, "steps": 2}}})
    resumed = prune_student(one_step)
    straight = prune_student({**one_step, "out": str(tmp_path / "straight")})
    assert resumed["recover"]["status"] == "resumed" and straight["recover"]["status"] == "ran"
    a = read_model_file(tmp_path / "one_step" / "recovered_ema.safetensors")[1]
    b = read_model_file(tmp_path / "straight" / "recovered_ema.safetensors")[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pruning_a_student_on_pairs_of_other_classes_is_refused_before_any_work(tmp_path):
    from slimflow.stages.prune import prune_student

    make_store(tmp_path, teacher_file(tmp_path))
    cfg = {
        "out": str(tmp_path / "pruned"),
        "student": str(cond_one_step_student(tmp_path, num_classes=5)),
        "pairs": str(tmp_path / "pairs"),
        "prune": {"importance": "taylor", "macs_fraction": 0.5},
        "recover": {"mode": "flow"},
    }
    with pytest.raises(ValueError, match=r"class-conditional \(5 classes\) but the pair store .* \(3 classes\)"):
        prune_student(cfg)
    assert not (tmp_path / "pruned" / "pruned.safetensors").exists()


# ------------------------------------------------------------------------------------------- export, bench
def cond_student(tmp_path, resolution=16, num_classes=10):
    from slimflow.checkpoint import save_model

    torch.manual_seed(0)
    cfg = {"in_channels": 1, "resolution": resolution, "nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1}
    model = build_unet({**cfg, "attn_resolutions": [], "dropout": 0.0, "num_classes": num_classes})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
        model.map_label.weight.normal_(0.0, 2.0)  # labels that visibly change the images
    path = save_model(tmp_path / "cond.safetensors", model, {"model": model.config, "kind": "test"})
    return path, model.eval()


def test_export_of_a_conditional_generator_takes_the_label_as_a_second_input(tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the optional extra slimflow[onnx]")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX parity check needs the optional extra slimflow[onnx]")
    from slimflow.stages.export import OneStepGenerator, OnnxGenerator, export_model

    path, model = cond_student(tmp_path)
    report = export_model(path, tmp_path / "export", warmup=0, repeats=1)
    assert report["num_classes"] == 10 and report["label_input"] == ["label", "batch"]
    assert report["onnx"]["max_abs_diff"] < 1e-4 and report["torch_export"]["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(tmp_path / "export" / "generator.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["noise", "label"]
    assert [o.name for o in session.get_outputs()] == ["image"]
    z, labels = torch.randn(3, 1, 16, 16), torch.tensor([7, 0, 3])
    with torch.no_grad():
        expected = OneStepGenerator(model)(z, labels)
    got = session.run(None, {"noise": z.numpy(), "label": labels.numpy()})[0]
    assert abs(got - expected.numpy()).max() < 1e-4
    other = session.run(None, {"noise": z.numpy(), "label": torch.tensor([1, 1, 1]).numpy()})[0]
    assert abs(other - got).max() > 5e-4  # the label input matters
    generator = OnnxGenerator(tmp_path / "export" / "generator.onnx")
    assert generator.num_classes == 10 and OnnxGenerator.classes_of(tmp_path / "export" / "generator.onnx") == 10
    balanced = generator.sample(12, 0, 5)
    assert torch.allclose(balanced, sample(load_model(path), 12, seed=0)[0], atol=1e-4)


def test_int8_export_of_a_conditional_generator_runs_on_class_balanced_labels(tmp_path, monkeypatch):
    """The int8 file keeps the label input and is calibrated on the class-balanced labels of the calibration noise
    (i mod K); under given labels its images are close to the fp32 file's and the labels change them as they
    change the fp32 file's; the label path stays fp32; the --int8-budget scan and the reported image errors use
    the class-balanced labels of the check noise."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason="int8 export needs the optional extra slimflow[onnx]")
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime import quantization

    from slimflow.checkpoint import save_model
    from slimflow.stages.export import export_model, image_error, noise_path_excluded, quantize_int8

    torch.manual_seed(0)
    model = randomised(tiny_unet(num_classes=4))  # random weights: labels change the images well above int8 noise
    path = save_model(tmp_path / "cond.safetensors", model, {"model": model.config, "kind": "test"})
    calibrations, quantize_static = [], quantization.quantize_static

    class Replay(quantization.CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    def recorded(fp32, out, reader, **kwargs):  # keeps what the calibration reader feeds, and quantizes on it
        calibrations.append(list(iter(reader.get_next, None)))
        return quantize_static(fp32, out, Replay(calibrations[-1]), **kwargs)

    monkeypatch.setattr(quantization, "quantize_static", recorded)
    budget, options = 0.01, {"formats": ("onnx",), "warmup": 0, "repeats": 1, "calibration": 8}
    report = export_model(path, tmp_path / "out", int8=True, calibration_batch=3, int8_budget=budget, **options)
    monkeypatch.undo()
    assert len(calibrations) == 1 + report["int8_mixed"]["quantizations"]
    for feeds in calibrations:  # batches of 3 of the noise of (1, 0..7), sample i of class i mod 4
        assert [feed["label"].tolist() for feed in feeds] == [[0, 1, 2], [3, 0, 1], [2, 3]]
        assert all(feed["label"].dtype == np.int64 for feed in feeds)
        assert np.array_equal(np.concatenate([f["noise"] for f in feeds]), noise_for(range(8), 1, (1, 8, 8)).numpy())

    fp32_file, int8_file = tmp_path / "out" / "generator.onnx", tmp_path / "out" / "generator.int8.onnx"
    fp32, int8 = (ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in (fp32_file, int8_file))
    assert [i.name for i in int8.get_inputs()] == ["noise", "label"] and int8.get_inputs()[1].type == "tensor(int64)"

    def images(session, z, labels):
        return torch.from_numpy(session.run(None, {"noise": z.numpy(), "label": labels.numpy()})[0])

    # the reported image error is on the check noise of (0, 0..63) and its class-balanced labels
    check, check_labels = noise_for(range(64), 0, (1, 8, 8)), torch.arange(64) % 4
    error = image_error(images(int8, check, check_labels), images(fp32, check, check_labels))
    assert report["int8"]["image_error_to_fp32"] == pytest.approx({"n": 64, **error})
    assert error["mean_abs_diff"] < 0.02 and error["rmse"] < 0.05  # measured: 0.0095 and 0.023
    # given labels: close to fp32, and changing them changes the int8 images as it changes the fp32 ones
    z, labels, other = noise_for(range(4), 5, (1, 8, 8)), torch.tensor([3, 0, 2, 1]), torch.tensor([1, 1, 1, 1])
    assert image_error(images(int8, z, labels), images(fp32, z, labels))["mean_abs_diff"] < 0.02
    change8 = images(int8, z, other) - images(int8, z, labels)
    change32 = images(fp32, z, other) - images(fp32, z, labels)
    assert change32[:3].abs().mean() > 0.02 and change32[3].abs().max() == 0  # sample 3 keeps its label
    assert (change8 - change32).abs().mean() < 0.25 * change32.abs().mean()

    # the label path (the label embedding and each block's projection of it, Gemm nodes that depend on the labels
    # and not on the noise) stays fp32, even with Gemm among the op types to quantize
    fp32_model = onnx.load(str(fp32_file))
    gemms = {n.name for n in fp32_model.graph.node if n.op_type == "Gemm"}
    assert any(name.startswith("map_label/") for name in gemms) and gemms <= set(noise_path_excluded(fp32_model))
    quantize_int8(fp32_file, tmp_path / "gemm.onnx", (1, 8, 8), 8, 1, int8_ops=("Conv", "MatMul", "Gemm"))
    quantized = onnx.load(str(tmp_path / "gemm.onnx")).graph
    dequantized = {n.output[0] for n in quantized.node if n.op_type == "DequantizeLinear"}
    int8_nodes = {
        n.name for n in quantized.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[0] in dequantized
    }
    assert int8_nodes and not int8_nodes & gemms

    # --int8-budget: the scan and the plan score the mixed files on the check noise's class-balanced labels
    mixed = report["int8_mixed"]
    assert mixed["int8_blocks"] and mixed["fp32_blocks"] and mixed["latency_ms_b1"] > 0
    plan = ort.InferenceSession(mixed["file"], providers=["CPUExecutionProvider"])
    assert [i.name for i in plan.get_inputs()] == ["noise", "label"]
    got = image_error(images(plan, check, check_labels), images(fp32, check, check_labels))["rmse"]
    assert got == pytest.approx(mixed["error"]) and got <= budget


def test_bench_reports_class_accuracy_of_conditional_entries_only(tmp_path):
    from slimflow.config import load_config
    from slimflow.metrics import CLASS_ACCURACY, class_accuracy
    from slimflow.stages.bench import DEFAULTS, bench, fingerprint

    path, _ = cond_student(tmp_path, resolution=32)
    plain = tiny_unet(resolution=32)
    from slimflow.checkpoint import save_model

    plain_path = save_model(tmp_path / "plain.safetensors", plain, {"model": plain.config, "kind": "test"})
    cfg = load_config(DEFAULTS)
    cfg.update(
        out=str(tmp_path / "bench"),
        device="cpu",
        grid=0,
        entries=[{"name": "cond", "model": str(path)}, {"name": "plain", "model": str(plain_path)}],
    )
    cfg["reference"]["n"] = 64
    cfg["metrics"].update(n_samples=40, batch_size=40, kid_subsets=2, cache_dir=str(tmp_path / "cache"))
    cfg["cost"].update(batch_sizes=[1], warmup=0, repeats=1)
    result = bench(cfg, command="pytest")
    cond_row, plain_row = result["rows"]
    assert 0.0 <= cond_row[CLASS_ACCURACY] <= 100.0 and CLASS_ACCURACY not in plain_row
    assert "class accuracy (domain) (%)" in (tmp_path / "bench" / "bench.md").read_text()
    # an unconditional entry's fingerprint has no new field
    from slimflow.checkpoint import content_hash, model_identity
    from slimflow.stages.runner import full_config

    full = full_config(DEFAULTS, cfg)
    entry = {"name": "plain", "model": str(plain_path), "method": "euler", "steps": 1, "tol": 1e-5}
    ids = {"domain": "x"}
    blob = {
        "entry": entry,
        "model": model_identity(plain_path),
        "extractors": ids,
        "reference": full["reference"],
        "metrics": {k: v for k, v in full["metrics"].items() if k != "cache_dir"},
        "cost": full["cost"],
        "device": "cpu",
        "torch": torch.__version__,
    }
    assert fingerprint(entry, full, torch.device("cpu"), ids) == content_hash(blob)
    # the metric itself: real test images, labelled by their true class, are mostly classified right
    from slimflow.data import load_images

    real = load_images("fashion_mnist", split="test")
    assert class_accuracy(real.images[:200], real.labels[:200]) > 80.0
    assert class_accuracy(real.images[:200], (real.labels[:200] + 1) % 10) < 20.0


def test_class_conditional_diffusers_teacher(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="optional extra 'diffusers' is not installed")
    from teachers.adapters import load_diffusers_teacher

    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=5,
    ).eval()
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(prediction_type="epsilon").save_pretrained(tmp_path / "unet")
    teacher = load_diffusers_teacher(tmp_path / "unet")
    assert teacher.num_classes == 5
    y, t, labels = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([1, 4])
    with torch.no_grad():
        a, b = teacher(y, t, labels), teacher(y, t, torch.tensor([0, 0]))
    assert a.shape == y.shape and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class-conditional"):
        teacher(y, t)
    with pytest.raises(ValueError, match="no 'no label' class"):
        teacher(y, t, torch.tensor([NO_LABEL, 0]))


# ------------------------------------------------------------------------------------------- run, CLI
def test_run_pipeline_on_a_conditional_teacher_and_sample_per_class(tmp_path):
    import numpy as np

    from slimflow.cli import main
    from slimflow.stages.run import run_pipeline

    teacher = teacher_file(tmp_path)
    train = {"batch_size": 6, "warmup": 1, "log_every": 2, "ckpt_every": 2, "lr": 1e-3}
    cfg = {
        "out": str(tmp_path / "run"),
        "teacher": str(teacher),
        "pairs": {
            "n": 12,
            "solver": {"method": "euler", "steps": 2},
            "shard_size": 6,
            "batch_size": 6,
            "guidance": 1.5,
        },
        "anneal": {"model": TINY, "train": {**train, "steps": 3}, "sample": {"n": 3}},
        "distill": {"train": {**train, "steps": 2}, "sample": {"n": 3}},
        "grids": {"n": 3, "seed": 0},
    }
    summary = run_pipeline(cfg)
    distilled = load_model(summary["stages"]["distill"]["export"])
    assert distilled.num_classes == 3
    assert read_model_file(summary["stages"]["distill"]["export"])[0]["pairs"]["guidance"] == 1.5
    main(
        [
            "sample",
            "--model",
            str(summary["stages"]["distill"]["export"]),
            "--n",
            "4",
            "--label",
            "2",
            "--out",
            str(tmp_path / "g.png"),
            "--npz",
            str(tmp_path / "two.npz"),
        ]
    )
    main(
        [
            "sample",
            "--model",
            str(summary["stages"]["distill"]["export"]),
            "--n",
            "4",
            "--out",
            str(tmp_path / "g.png"),
            "--npz",
            str(tmp_path / "balanced.npz"),
        ]
    )
    two = next(iter(np.load(tmp_path / "two.npz").values()))
    balanced = next(iter(np.load(tmp_path / "balanced.npz").values()))
    assert (two[2] == balanced[2]).all()  # sample 2 is of class 2 in both
    # the student's images depend on the label (a few training steps: differences below uint8 resolution)
    assert not torch.equal(sample(distilled, 4, labels=2)[0][0], sample(distilled, 4)[0][0])
    with pytest.raises(SystemExit) as info:
        main(
            [
                "sample",
                "--model",
                str(summary["stages"]["distill"]["export"]),
                "--label",
                "shirt",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
    assert "--label must be a class index or 'balanced', got 'shirt'" in str(info.value.code)


# ------------------------------------------------------------------------------------------- invert
def test_a_conditional_teacher_inverts_images_under_their_own_labels(tmp_path):
    from PIL import Image

    from slimflow.checkpoint import save_model
    from slimflow.data import load_images, to_float
    from slimflow.invert import round_trip
    from slimflow.stages.invert import invert_images

    torch.manual_seed(2)
    model = tiny_unet(num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        model.map_label.weight.normal_(0.0, 2.0)
    path = save_model(tmp_path / "cond.safetensors", model, {"model": model.config, "kind": "test"})
    summary = invert_images(path, "digits", steps=2, out_dir=tmp_path / "o", n=5, nfe_per_direction=(4,), device="cpu")
    data = load_images("digits", split="test", image_size=8)
    x, labels = to_float(data.images[:5]), data.labels[:5]
    _, rebuilt, _ = round_trip(conditioned(model, labels), x, "rf_solver", 2)
    assert summary["mse"] == pytest.approx((rebuilt - x).double().pow(2).mean().item(), rel=1e-6)
    _, other, _ = round_trip(conditioned(model, (labels + 1) % 10), x, "rf_solver", 2)
    assert not torch.allclose(other, rebuilt)  # the labels matter, so the ones used were the images' own
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (8, 8), 100).save(flat / "a.png")
    with pytest.raises(ValueError, match="class-conditional \\(10 classes\\): it inverts images under their labels"):
        invert_images(path, flat, out_dir=tmp_path / "o2", device="cpu")
