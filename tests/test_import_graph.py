"""The package's import graph: every module imports in a fresh interpreter, no import cycle (counting imports inside
functions), and the apps (cli, demo, ``__main__``) are imported by no library module."""

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import metapeft

PACKAGE = Path(metapeft.__file__).resolve().parent
APPS = {"metapeft.cli", "metapeft.demo", "metapeft.__main__"}


def module_names() -> list[str]:
    """Every module of the package by walking it (``__main__`` excluded: importing it runs the command line)."""
    names = ["metapeft"] + [info.name for info in pkgutil.walk_packages([str(PACKAGE)], prefix="metapeft.")]
    return sorted(name for name in names if name != "metapeft.__main__")


def source_of(name: str) -> Path:
    relative = Path(*name.split(".")[1:])
    folder = PACKAGE / relative
    return folder / "__init__.py" if folder.is_dir() else PACKAGE / relative.with_suffix(".py")


def imports_of(name: str, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source, functions included; ``from X import y`` counts
    as importing ``X.y`` when that is a module, else ``X``. A compiled extension imports nothing of ours."""
    path = source_of(name)
    if not path.is_file():
        return set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search with colours)."""
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


def import_graph() -> dict[str, set[str]]:
    modules = set(module_names()) | {"metapeft.__main__"}
    return {name: imports_of(name, modules) for name in modules}


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_in_a_fresh_interpreter():
    script = ("import importlib, json, sys\n"
              "names = json.loads(sys.argv[1])\n"
              "for name in names:\n"
              "    importlib.import_module(name)\n")
    names = module_names()
    assert "metapeft.cli" in names and "metapeft.trainer.loop" in names
    result = subprocess.run([sys.executable, "-c", script, json.dumps(names)], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_import_cycle_and_no_library_module_imports_an_app():
    graph = import_graph()
    assert "metapeft.metrics" in graph["metapeft.demo"] and "metapeft.cli" not in graph["metapeft.demo"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    importers = {f"{name} imports {app}" for name, imported in graph.items() for app in APPS & imported
                 if name not in APPS}
    assert not importers, sorted(importers)
