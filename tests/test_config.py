import pytest

from slimflow.config import ConfigError, load_config, parse_override

DEFAULTS = {"out": "runs/x", "train": {"lr": 1e-3, "steps": 10, "ema": {"kind": "fixed"}}, "model": {"_open": True}}


def test_preset_and_overrides_merge(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 0.01\nmodel:\n  nf: 32\n")
    cfg = load_config(DEFAULTS, preset, ["train.steps=5", "train.ema.kind=power", "model.ch_mult=[1,2]"])
    assert cfg == {
        "out": "runs/x",
        "train": {"lr": 0.01, "steps": 5, "ema": {"kind": "power"}},
        "model": {"nf": 32, "ch_mult": [1, 2]},
    }


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*Did you mean 'train.lr'"):
        load_config(DEFAULTS, preset)
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(DEFAULTS, None, ["trian.lr=1"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DEFAULTS, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DEFAULTS, bad)
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(DEFAULTS, None, ["train=3"])


def test_make_config_takes_values_as_they_are():
    import slimflow

    cfg = slimflow.make_config("run", "quickstart", pairs__n=2000, pairs__dir=None, anneal__model__nf=16)
    assert cfg["pairs"]["n"] == 2000 and cfg["pairs"]["dir"] is None  # None stays None (not the string "None")
    assert cfg["anneal"]["model"] == {"preset": "fmnist-student-s", "nf": 16}  # an open mapping takes new keys
    with pytest.raises(ConfigError, match="unknown config key 'pairs.nn'"):
        slimflow.make_config("run", "quickstart", pairs__nn=1)


def test_n_of_m_patterns_stay_strings_in_overrides_and_files(tmp_path):
    from slimflow.config import load_yaml, parse_override, yaml_load

    # YAML 1.1 reads 2:4 as the base-60 integer 124; the project's loader keeps it as written
    assert parse_override("sparsity.pattern=2:4") == {"sparsity": {"pattern": "2:4"}}
    (tmp_path / "c.yaml").write_text("pattern: 2:4\nrate: 0.5\nsteps: 1_000\nlr: 1.0e-3\n")
    assert load_yaml(tmp_path / "c.yaml") == {"pattern": "2:4", "rate": 0.5, "steps": 1000, "lr": 0.001}
    assert yaml_load("[0x10, .inf, null, true]") == [16, float("inf"), None, True]
