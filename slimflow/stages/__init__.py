"""The stages: each reads files, writes files, and is a sub-command of the CLI.

`CONFIG_STAGES` is the one registry of the stages that take a config: name -> (module, function). Each module
has `DEFAULTS` (the settings and their defaults) and `check_config(cfg)` (raises on a bad setting before any work);
the CLI's config commands and the benchmark's `prepare` list both read it. Modules are imported when used.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from types import ModuleType

CONFIG_STAGES: dict[str, tuple[str, str]] = {
    "teacher": ("slimflow.stages.teacher", "train_teacher"),
    "pairs": ("slimflow.stages.pairs", "generate_pairs_from_config"),
    "anneal": ("slimflow.stages.anneal", "anneal"),
    "distill": ("slimflow.stages.distill", "distill"),
    "run": ("slimflow.stages.run", "run_pipeline"),
    "prune": ("slimflow.stages.prune", "prune_student"),
    "bench": ("slimflow.stages.bench", "bench"),
    "fid": ("slimflow.stages.fid", "fid"),
}


def stage(name: str) -> tuple[ModuleType, Callable]:
    """(module, entry function) of the config stage `name`."""
    if name not in CONFIG_STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(CONFIG_STAGES)}")
    module_name, function = CONFIG_STAGES[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, function)


def run_stage(fn: Callable, cfg: dict, command: str | None):
    """Call a stage's entry function on a loaded config, with the command line to record when it takes one."""
    takes_command = "command" in inspect.signature(fn).parameters
    return fn(cfg, command=command) if takes_command else fn(cfg)
