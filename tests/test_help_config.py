"""`--help-config`: every setting of every config stage has a one-line meaning, kept in one place (each stage's
`HELP` next to its `DEFAULTS`; the training settings' in `slimflow.engine.TRAIN_HELP`), and the command lists them
all with their merged values."""

import json

import pytest

from slimflow.cli import CONFIG_COMMANDS, main
from slimflow.config import describe_config, flatten, meaning, strip_markers
from slimflow.stages import CONFIG_STAGES, stage


@pytest.mark.parametrize("name", list(CONFIG_STAGES))
def test_every_default_setting_has_a_meaning_and_every_meaning_a_setting(name):
    module, _ = stage(name)
    settings = flatten(strip_markers(module.DEFAULTS))
    undocumented = [key for key in settings if not module.HELP.get(key)]
    assert not undocumented, f"{name}: add these settings to HELP in {module.__name__}: {undocumented}"
    # every documented key is a setting or a mapping above settings (an open mapping such as `model`)
    stale = [k for k in module.HELP if k not in settings and not any(s.startswith(k + ".") for s in settings)]
    assert not stale, f"{name}: HELP documents settings that do not exist: {stale}"
    assert all("\n" not in text for text in module.HELP.values())  # one line each


def test_keys_added_to_an_open_mapping_take_the_mapping_s_meaning():
    meanings = {"model": "the network", "model.preset": "a named one", "train.lr": "rate"}
    assert meaning(meanings, "model.nf") == "the network" and meaning(meanings, "model.preset") == "a named one"
    assert meaning(meanings, "train.steps") is None
    text = describe_config({"model": {"nf": 8}, "train": {"steps": 3}}, meanings)
    assert text.splitlines() == ["model.nf = 8     # the network", "train.steps = 3  # (undocumented)"]


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=[c[1] for c in CONFIG_COMMANDS])
def test_help_config_lists_every_setting_with_its_value_and_meaning(command, capsys):
    parent, name, _, _, stage_name = command
    argv = [parent, name] if parent else [name]
    main([*argv, "--print-config"])
    merged = flatten(__import__("yaml").safe_load(capsys.readouterr().out))
    main([*argv, "--help-config", "train.seed=7"] if "train.seed" in merged else [*argv, "--help-config"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(merged)
    module, _ = stage(stage_name)
    for line, (key, value) in zip(lines, merged.items()):
        setting, _, text = line.partition("  # ")
        shown_key, _, shown_value = setting.strip().partition(" = ")
        assert shown_key == key
        expected = 7 if key == "train.seed" else value
        assert json.loads(shown_value) == expected, key
        assert text == meaning(module.HELP, key) and text != "(undocumented)", key
