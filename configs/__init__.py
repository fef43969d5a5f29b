"""The YAML presets, installed with the package as `slimflow.presets` (found by name: `--config quickstart`)."""
