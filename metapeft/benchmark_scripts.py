"""The benchmark scripts of a source checkout (``benchmarks/`` beside the ``metapeft`` package), for
``metapeft bench``.

A benchmark is a file ``benchmarks/bench_<name>.py`` (a plain script, run with ``python``) or
``benchmarks/test_<name>.py`` (a pytest-benchmark module, run with ``python -m pytest``); its summary is the first
line of its docstring. Other modules there (the harness, the contenders) are helpers. Wheels do not ship
``benchmarks/``: the scripts need the repository.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PREFIXES = ("bench_", "test_")


@dataclass(frozen=True)
class BenchmarkScript:
    """One benchmark: its ``name`` (the file stem without the prefix), ``path`` and one-line ``summary``."""

    name: str
    path: Path
    summary: str

    def command(self, quick: bool) -> list[str]:
        """The command that runs it from the checkout's root; ``quick`` asks for a smoke run (the scripts'
        ``--quick``; one untimed round per case for pytest-benchmark modules)."""
        if self.path.name.startswith("test_"):
            return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(self.path)] + \
                (["--benchmark-disable"] if quick else [])
        return [sys.executable, str(self.path)] + (["--quick"] if quick else [])


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout this ``metapeft`` is imported from; a ``FileNotFoundError`` saying
    so for an installed wheel."""
    import metapeft

    package = Path(metapeft.__file__).resolve().parent
    folder = package.parent / "benchmarks"
    if not (folder / "harness.py").is_file():
        raise FileNotFoundError(
            f"metapeft bench runs the benchmark scripts of a source checkout, and this metapeft ({package}) is "
            f"installed without one ({folder} does not exist): clone the metapeft repository, install it with "
            "`pip install --no-build-isolation -e .` and run `metapeft bench` (or `python benchmarks/bench_*.py`) "
            "from there")
    return folder


def summary_line(path: Path) -> str:
    """The first line of the module docstring of ``path`` (empty when it has none)."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return docstring.strip().splitlines()[0] if docstring.strip() else ""


def benchmark_scripts(folder: Path) -> dict[str, BenchmarkScript]:
    """Every benchmark in ``folder`` (module docstring), by name, in file-name order."""
    scripts = {}
    for path in sorted(folder.glob("*.py")):
        prefix = next((p for p in PREFIXES if path.name.startswith(p)), None)
        if prefix is not None:
            name = path.stem.removeprefix(prefix)
            scripts[name] = BenchmarkScript(name, path, summary_line(path))
    return scripts
