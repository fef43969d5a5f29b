"""The paper presets (configs/paper/): they merge onto their commands' defaults, carry the published settings,
build the published networks, and (slow) run end to end on this CPU at their real architecture and resolution."""

from __future__ import annotations

import json

import pytest
from paper_smoke import PRESET_FILES, PRESETS, SMOKE_CLASSES, image_folder, preset_config, smoke_configs

from slimflow.config import ConfigError, load_config, preset_names, resolve_config
from slimflow.domain_net import MissingWeightsError
from slimflow.stages import run as run_stage
from slimflow.stages import stage
from teachers.zoo import build_model

# SlimFlow's DDPM++ sizes (params in thousands, as published: 61.80M, 27.906M, ...); the smallest differs at 64x64
PUBLISHED_K = {
    "ddpmpp-61.8m": {32: 61_804, 64: 61_804},
    "ddpmpp-27.9m": {32: 27_906, 64: 27_906},
    "ddpmpp-15.7m": {32: 15_707, 64: 15_707},
    "ddpmpp-7.0m": {32: 6_990, 64: 6_990},
    "ddpmpp-3.4m": {32: 3_437, 64: 3_536},
}
TEACHER_PARAMS = 61_804_419  # the teacher's exact count (RectifiedFlow's CIFAR-10 DDPM++)
STUDENTS = ("ddpmpp-27.9m", "ddpmpp-15.7m", "ddpmpp-7.0m", "ddpmpp-3.4m")


def params_k(spec: dict, resolution: int) -> int:
    model = build_model({**spec, "resolution": resolution})
    return round(sum(p.numel() for p in model.parameters()) / 1000)


def test_every_paper_preset_merges_onto_its_command():
    names = {name for name in preset_names() if name.startswith("paper/")}
    expected = {pattern.format(p) for p in PRESETS for pattern in PRESET_FILES.values()}
    assert names == expected
    for preset in PRESETS:
        for command in PRESET_FILES:
            cfg = preset_config(command, preset)  # load_config refuses any key the command does not know
            assert cfg["out"].startswith(f"runs/paper/{preset}")


def test_a_misspelt_key_in_a_paper_preset_is_refused(tmp_path):
    text = resolve_config("paper/cifar10").read_text().replace("  hflip: true", "  hflipp: true")
    (tmp_path / "typo.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"anneal\.hflipp.*Did you mean 'anneal\.hflip'"):
        load_config(run_stage.DEFAULTS, tmp_path / "typo.yaml")


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_presets_build_the_published_networks(preset):
    size = PRESETS[preset]
    teacher = preset_config("teacher", preset)
    assert teacher["data"]["image_size"] == size
    classes = teacher["model"].get("num_classes", 0)
    assert classes == (1000 if preset == "imagenet64" else 0)  # ImageNet-64 is class-conditional, as in the paper
    plain = {**teacher["model"], "num_classes": 0}
    assert params_k(plain, size) == PUBLISHED_K["ddpmpp-61.8m"][size]
    label_embedding = (classes * 128 + 128) if classes else 0  # map_label: a Linear K -> nf (128) with bias
    assert params_k(teacher["model"], size) == round((TEACHER_PARAMS + label_embedding) / 1000)
    student = preset_config("run", preset)["anneal"]["model"]
    assert params_k(student, size) == PUBLISHED_K[student["preset"]][size]
    for name in STUDENTS:  # every student size through the documented key anneal.model.preset
        spec = preset_config("run", preset, {"anneal": {"model": {"preset": name}}})["anneal"]["model"]
        assert params_k(spec, size) == PUBLISHED_K[name][size]


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_presets_carry_the_published_training_settings(preset):
    run = preset_config("run", preset)
    stages = {
        "teacher": preset_config("teacher", preset)["train"],
        "anneal": run["anneal"]["train"],
        "distill": run["distill"]["train"],
        "recover": preset_config("prune", preset)["recover"]["train"],
    }
    for name, train in stages.items():
        assert (train["batch_size"], train["lr"], train["grad_clip"], train["optimizer"]) == (128, 2e-4, 1.0, "adam")
        assert train["ema"]["kind"] == "power" and train["ema"]["max_decay"] == 0.999999, name
        assert train["warmup"] == (5000 if name in ("teacher", "anneal") else 0), name  # no warm-up when fine-tuning
    assert run["anneal"]["beta"] == {"schedule": "linear", "steps": 300_000, "value": 1.0}
    assert run["anneal"]["hflip"] is True
    assert run["pairs"]["solver"]["method"] == "dopri5" and run["pairs"]["solver"]["rtol"] == 1e-5
    loss = run["distill"]["loss"]
    assert (loss["distance"], loss["options"], loss["t_min"], loss["t_max"]) == ("lpips-vgg", {"size": 64}, 0.2, 0.8)
    assert loss["one_step_time"] == 1e-3
    bench = preset_config("bench", preset)
    assert bench["metrics"]["extractors"] == ["inception"] and bench["metrics"]["n_samples"] == 50_000
    assert bench["reference"]["split"] == "train" and bench["reference"]["image_size"] == PRESETS[preset]


def test_without_vgg_weights_a_paper_run_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))  # no VGG16 file there
    cfg = preset_config("run", "cifar10", {"out": str(tmp_path / "run")})
    with pytest.raises(MissingWeightsError, match=r"vgg16-397923af\.pth"):
        run_stage.run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_paper_preset_smoke_run_finishes_every_stage(preset, tmp_path):
    """teacher (1 step) -> run (4 pairs, 1 anneal and 1 distill step) -> bench -> prune (+1 recovery step) -> bench
    with the pruned entry (the other entries' results are cached)."""
    images = image_folder(tmp_path / "images", PRESETS[preset], classes=SMOKE_CLASSES.get(preset, 0))
    work = tmp_path / "work"
    configs = smoke_configs(preset, work, images)
    for command in ("teacher", "run"):
        stage(command)[1](configs[command])
    assert json.loads((work / "run" / "summary.json").read_text())["stages"]["distill"]["steps"] == 1
    bench, entries = stage("bench")[1], configs["bench"]["entries"]
    unpruned = [e for e in entries if not e["model"].startswith(str(work / "prune"))]
    bench({**configs["bench"], "entries": unpruned})
    assert_table(work / "bench" / "bench.md", unpruned)
    stage("prune")[1](configs["prune"])
    pruned = json.loads((work / "prune" / "summary.json").read_text())["prune"]
    assert pruned["params_after"] < pruned["params_before"]
    # DDPM++ skip concatenations straddle 32-group GroupNorms: regrouped, keeping their group counts (whole_groups)
    assert pruned["regrouped_groupnorms"]
    assert all(r["groups"][1] == r["groups"][0] for r in pruned["regrouped_groupnorms"].values())
    bench(configs["bench"])
    assert_table(work / "bench" / "bench.md", entries)


def assert_table(path, entries) -> None:
    table = path.read_text()
    for entry in entries:
        assert f"| {entry['name']} |" in table
    assert "FID (domain)" in table
