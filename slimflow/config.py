"""YAML presets with `key.path=value` overrides, checked against each command's defaults.

A preset is data: a nested mapping. Every command owns a nested dict of defaults; a preset and the
command-line overrides are merged onto it, and any key the defaults do not know is an error (a typo in a
config must never be silently ignored).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from slimflow.checkpoint import atomic_write_text


class ConfigError(ValueError):
    """A config file or override that cannot be used as written."""


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, path + "."))
    return keys


def _unknown_key_error(path: str, level: dict, prefix: str, where: str) -> ConfigError:
    known = _flat_keys(level, prefix)
    close = difflib.get_close_matches(path, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {path!r} in {where}.{hint}")


def merge(defaults: dict, update: dict, where: str = "config", _prefix: str = "") -> dict:
    """Return a copy of `defaults` with `update` merged in; unknown keys raise ConfigError.

    A dict marked open (key `_open: true`, e.g. a model spec) accepts any sub-keys.
    """
    out = copy.deepcopy(defaults)
    for key, value in (update or {}).items():
        path = f"{_prefix}{key}"
        if key not in out and not out.get("_open"):
            raise _unknown_key_error(path, defaults, _prefix, where)
        current = out.get(key)
        if isinstance(current, dict) and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} in {where} must be a mapping, got {value!r}")
            out[key] = merge(current, value, where, path + ".")
        else:
            out[key] = _as_type_of(current, value, path, where)
    return out


def _as_type_of(default: Any, value: Any, path: str, where: str) -> Any:
    """`value` as the number type of `default` (YAML reads `1e-3` as a string); a value that is not such a number
    is an error naming the key. Keys whose default is not a number are taken as given."""
    if isinstance(default, bool) or not isinstance(default, (int, float)) or value is None:
        return copy.deepcopy(value)
    kind = "an integer" if isinstance(default, int) else "a number"
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ConfigError(f"config key {path!r} in {where} must be {kind}, got {value!r}")
    if isinstance(default, int):
        if number != int(number):
            raise ConfigError(f"config key {path!r} in {where} must be {kind}, got {value!r}")
        return int(number)
    return float(number)


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers, so that `2:4` (an n:m sparsity pattern) or `1:30`
    stay strings instead of becoming the integers 124 and 90. Other scalars resolve as in `yaml.safe_load`."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


# PyYAML's int and float patterns less their base-60 alternatives
_Loader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def yaml_load(text: str):
    """YAML text to Python data, as `yaml.safe_load` reads it but without base-60 numbers (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {'a': {'b': {'c': value}}}; the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    path, raw = text.split("=", 1)
    if not path or any(not part for part in path.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml_load(raw) if raw != "" else ""
    tree: dict = {}
    node = tree
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def presets_root() -> Path:
    """Where the presets are installed (the package `slimflow.presets`, from the repository's configs/)."""
    import importlib.resources

    try:
        return Path(str(importlib.resources.files("slimflow.presets")))
    except ModuleNotFoundError:  # a checkout used without installing it: the repository's own folder
        return Path(__file__).resolve().parents[1] / "configs"


def preset_names() -> list[str]:
    root = presets_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config(spec: str | Path) -> Path:
    """A config file: `spec` itself when it exists, else the installed preset it names — `quickstart`,
    `bench/fmnist-cpu`, or a repository path such as `configs/quickstart.yaml` — from any directory."""
    path = Path(spec)
    if path.is_file():
        return path
    name = str(spec).removeprefix("configs/").removesuffix(".yaml")
    preset = presets_root() / f"{name}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"config file {str(spec)!r} does not exist, and no preset has that name; presets: {', '.join(preset_names())}"
    )


def load_yaml(path: str | Path) -> dict:
    path = resolve_config(path)
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(
    defaults: dict, path: str | Path | None = None, overrides: Iterable[str] = (), update: dict | None = None
) -> dict:
    """defaults ← preset file ← `key.path=value` overrides ← `update` (a nested mapping of values), each layer
    checked for unknown keys."""
    cfg = copy.deepcopy(defaults)
    if path is not None:
        cfg = merge(cfg, load_yaml(path), where=str(path))
    for text in overrides:
        cfg = merge(cfg, parse_override(text), where=f"override {text!r}")
    if update:
        cfg = merge(cfg, update, where="the given settings")
    return strip_markers(cfg)


def strip_markers(cfg: Any) -> Any:
    if isinstance(cfg, dict):
        return {k: strip_markers(v) for k, v in cfg.items() if k != "_open"}
    return cfg


def dump(cfg: dict, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))


# ------------------------------------------------------------------------------------------ what settings mean
def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """The settings of a nested config by dotted key, e.g. {"train.lr": 2e-4}; an empty mapping is one setting."""
    out = {}
    for key, value in cfg.items():
        if key == "_open":
            continue
        if isinstance(value, dict) and strip_markers(value):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def prefixed(meanings: dict[str, str], prefix: str, drop: Iterable[str] = ()) -> dict[str, str]:
    """`meanings` of a nested section, keyed under `prefix` (e.g. "train."), without the top-level keys `drop`."""
    drop = tuple(drop)
    return {prefix + key: text for key, text in meanings.items() if key.split(".")[0] not in drop}


def meaning(meanings: dict[str, str], key: str) -> str | None:
    """What the setting `key` means: its own entry, else that of the nearest mapping above it that has one (the
    keys a user adds to an open mapping such as `model`)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = meanings.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def describe_config(cfg: dict, meanings: dict[str, str]) -> str:
    """Every setting of `cfg` with its value and its one-line meaning (the text of `--help-config`)."""
    settings = {key: json.dumps(value) for key, value in flatten(cfg).items()}
    width = max(len(f"{key} = {value}") for key, value in settings.items())
    lines = []
    for key, value in settings.items():
        text = meaning(meanings, key) or "(undocumented)"
        lines.append(f"{f'{key} = {value}':<{min(width, 60)}}  # {text}")
    return "\n".join(lines) + "\n"
