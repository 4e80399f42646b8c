"""The layers of the package (docs/architecture.md): every import points to the same layer or one below it; no
import cycle (imports inside functions included); no library module imports an app; every module imports in a fresh
interpreter."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Longest matching prefix wins. 0 kernels -> 1 ops -> 2 layers and foundations -> 3 model surgery
# -> 4 meta engine, trainer and run building -> 5 apps (and the package root, which re-exports everything).
LAYERS = {
    "metapeft.kernels": 0, "metapeft._C": 0,
    "metapeft.ops": 1, "metapeft.modulator": 1,
    "metapeft.layers": 2, "metapeft.heads": 2, "metapeft.losses": 2, "metapeft.metrics": 2, "metapeft.data": 2,
    "metapeft.atomic_files": 2, "metapeft.runs.lock": 2, "metapeft.stats": 2, "metapeft.report": 2,
    "metapeft.schema": 2,
    "metapeft.inject": 3, "metapeft.params": 3, "metapeft.adapter_files": 3, "metapeft.gamma": 3,
    "metapeft.backbones": 3, "metapeft.merging": 3, "metapeft.hf_peft": 3,
    "metapeft.meta": 4, "metapeft.trainer": 4, "metapeft.runs": 4, "metapeft.hf_trainer": 4,
    "metapeft.reference": 4,
    "metapeft.cli": 5, "metapeft.demo": 5, "metapeft.sweep": 5, "metapeft.build_info": 5, "metapeft.__main__": 5,
    "metapeft.benchmark_scripts": 5,
    "metapeft": 5,
}


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name (None: not one of ours)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, absolute; ``from metapeft import x`` counts as ``metapeft.x`` when ``x`` is a
    submodule and as the package root otherwise."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = any((ROOT / Path(*candidate.split("."))).with_suffix(suffix).exists()
                                for suffix in (".py", "")) or candidate in LAYERS
                found.add(candidate if is_module else base)
    return found


SOURCES = sorted(ROOT.joinpath("metapeft").rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers(path):
    name = module_name(path)
    own = layer_of(name)
    assert own is not None, f"{name} has no layer: add it to LAYERS here and to docs/architecture.md"
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    upward = sorted(f"{target} (layer {layer_of(target)})" for target in imports(path, package)
                    if (layer_of(target) or 0) > own)
    assert not upward, f"{name} (layer {own}) imports upward: {upward}"


APPS = {"metapeft.cli", "metapeft.demo", "metapeft.__main__"}


def import_graph() -> dict[str, set[str]]:
    """Each module of ``metapeft`` -> the modules of ``metapeft`` it imports anywhere in its source."""
    names = {module_name(path): path for path in ROOT.joinpath("metapeft").rglob("*.py")}
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {target for target in imports(path, package) if target in names and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_and_no_library_module_imports_an_app():
    graph = import_graph()
    assert "metapeft.metrics" in graph["metapeft.demo"] and "metapeft.cli" not in graph["metapeft.demo"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
    importers = {f"{name} imports {app}" for name, imported in graph.items() for app in APPS & imported
                 if name not in APPS}
    assert not importers, sorted(importers)


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(name for name in import_graph() if name != "metapeft.__main__")  # importing it runs the CLI
    assert "metapeft.cli" in names and "metapeft.trainer.loop" in names
    script = "import importlib, json, sys\nfor name in json.loads(sys.argv[1]):\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script, json.dumps(names)], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
