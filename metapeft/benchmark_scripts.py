"""The benchmark scripts of a source checkout (``benchmarks/`` beside the ``metapeft`` package), for
``metapeft bench``.

A benchmark is a runnable module of ``benchmarks/``: a script with an ``if __name__ == "__main__":`` block (run with
``python``) or a pytest-benchmark module defining ``test_*`` functions (run with ``python -m pytest``). Its name is
the file name without ``.py`` and a ``bench_`` or ``test_`` prefix, its summary the first line of its docstring.
Modules with neither (the harness, the contenders) are helpers. Wheels do not ship ``benchmarks/``: the scripts
need the repository.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PREFIXES = ("bench_", "test_")


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
        isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"


@dataclass(frozen=True)
class BenchmarkScript:
    """One benchmark: its ``name`` (the file stem without the prefix), ``path``, one-line ``summary`` and whether it
    is a ``pytest`` module rather than a script."""

    name: str
    path: Path
    summary: str
    pytest: bool

    def command(self, quick: bool) -> list[str]:
        """The command that runs it from the checkout's root; ``quick`` asks for a smoke run (the scripts'
        ``--quick``; one untimed round per case for pytest-benchmark modules)."""
        if self.pytest:
            return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(self.path)] + \
                (["--benchmark-disable"] if quick else [])
        return [sys.executable, str(self.path)] + (["--quick"] if quick else [])


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout this ``metapeft`` is imported from; a ``FileNotFoundError`` saying
    so for an installed wheel."""
    import metapeft

    package = Path(metapeft.__file__).resolve().parent
    folder = package.parent / "benchmarks"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"metapeft bench runs the benchmark scripts of a source checkout, and this metapeft ({package}) is "
            f"installed without one ({folder} does not exist): clone the metapeft repository, install it with "
            "`pip install --no-build-isolation -e .` and run `metapeft bench` (or `python benchmarks/bench_*.py`) "
            "from there")
    return folder


def benchmark_scripts(folder: Path) -> dict[str, BenchmarkScript]:
    """Every benchmark in ``folder`` (module docstring), by name, in file-name order."""
    scripts = {}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        script = any(_is_main_guard(node) for node in tree.body)
        tests = any(isinstance(node, ast.FunctionDef) and node.name.startswith("test_") for node in tree.body)
        if script or tests:
            name = next((path.stem.removeprefix(p) for p in PREFIXES if path.stem.startswith(p)), path.stem)
            summary = (ast.get_docstring(tree) or "").strip()
            scripts[name] = BenchmarkScript(name, path, summary.splitlines()[0] if summary else "", not script)
    return scripts
