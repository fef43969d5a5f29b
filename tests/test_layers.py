"""The layering of the code base, read from the source: no import cycle, `pruning/` generic, imports go downwards,
and loading a model file pulls in no stage."""

import ast
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("slimflow", "teachers", "pruning")
# bottom (0) to top; a module may import its own layer or lower ones. pruning/ is a library beside them all.
LAYERS = {
    "maths": ["slimflow.flow", "slimflow.solvers", "slimflow.invert", "slimflow.checkpoint", "slimflow.config"],
    "models": ["teachers", "slimflow.losses", "slimflow.domain_net", "slimflow.sample"],
    "runtime": [
        "slimflow.engine",
        "slimflow.data",
        "slimflow.images",
        "slimflow.pairs",
        "slimflow.cost",
        "slimflow.metrics",
    ],
    "stages": ["slimflow.stages"],
    "entry points": ["slimflow.cli", "slimflow.api"],
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """Every project module `path` imports, at module level or inside functions (relative imports resolved).
    `from pkg import name` depends on the submodule pkg.name when there is one, else on pkg itself."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(f): f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}
    edges = {}
    for name, path in files.items():
        # `from pkg import name` names a module or an attribute: keep what is a module of the project
        edges[name] = {m for m in project_imports(path, set(files)) if m in files and m != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> int | None:
    best = None
    for rank, prefixes in enumerate(LAYERS.values()):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return None if best is None else best[0]


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_pruning_imports_nothing_of_slimflow_or_teachers():
    bad = {
        m: sorted(i for i in deps if i.split(".")[0] in ("slimflow", "teachers"))
        for m, deps in graph().items()
        if m.split(".")[0] == "pruning"
    }
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_every_module_has_a_layer_and_imports_only_downwards():
    edges = graph()
    unplaced = sorted(m for m in edges if m.split(".")[0] != "pruning" and layer_of(m) is None and m not in PACKAGES)
    assert not unplaced, f"modules without a layer: {unplaced}"
    upward = [
        f"{m} ({list(LAYERS)[layer_of(m)]}) imports {d} ({list(LAYERS)[layer_of(d)]})"
        for m, deps in edges.items()
        for d in sorted(deps)
        if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def test_loading_a_pruned_student_imports_no_stage_and_no_tensorboard(tmp_path):
    from test_pruning_flow import TINY

    from pruning.serialization import input_specs
    from pruning.structured import prune_structured
    from slimflow.checkpoint import save_model
    from teachers.pruned import example_inputs, unet_custom_pruners
    from teachers.unet import build_unet

    config = TINY  # the pruning tests' UNet: attention at 8x8, so its NIN layers are pruned too
    model = build_unet(config)
    inputs = example_inputs(config)
    report = prune_structured(model, inputs, ratio=0.5, global_pruning=False, custom_pruners=unet_custom_pruners())
    record = {"history": report["history"], "example_inputs": input_specs(inputs)}
    path = save_model(tmp_path / "pruned.safetensors", model, {"model": config, "pruning": record})
    code = (
        "import sys; from teachers.zoo import load_model; m = load_model(sys.argv[1]); "
        "print(sum(p.numel() for p in m.parameters())); "
        "print(' '.join(sorted(k for k in sys.modules if k.startswith(('slimflow', 'teachers', 'pruning', "
        "'torch.utils.tensorboard', 'tensorboard')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.splitlines()
    assert (
        int(out[0])
        == sum(p.numel() for p in model.parameters())
        < sum(p.numel() for p in build_unet(config).parameters())
    )
    loaded = out[1].split()
    assert not [
        m for m in loaded if m.startswith(("slimflow.stages", "slimflow.cli", "torch.utils.tensorboard", "tensorboard"))
    ], loaded
    assert "teachers.zoo" in loaded and torch.nn  # the loader itself was imported
