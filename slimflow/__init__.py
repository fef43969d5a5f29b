"""slimflow: a compression workbench for one-step generative models (see README.md and docs/methods.md).

The public API (`load`, `generate`, `make_config`, `run`, `export`, `fid`) lives in `slimflow.api` and is imported on
first use, so importing a submodule (e.g. to load a model file) does not pull in the stages.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slimflow")
except PackageNotFoundError:  # a checkout that was not installed
    __version__ = "0+unknown"

API = ("load", "generate", "make_config", "run", "export", "fid")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from slimflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'slimflow' has no attribute {name!r}")
