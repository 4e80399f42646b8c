"""The test suite's own layout: helpers come only from ``tests.helpers``, so no test module is imported twice."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_test_module_imports_another_test_module_or_a_conftest():
    offenders = {
        f"{path.relative_to(TESTS)} imports {name}"
        for path in TESTS.rglob("*.py")
        for name in imported_modules(path)
        if name.startswith("tests.") and not name.startswith("tests.helpers")
        or name.split(".")[-1] == "conftest"
    }
    assert not offenders, sorted(offenders)


def test_every_test_folder_is_a_package():
    """With an ``__init__.py`` in every folder pytest imports each module once, under its package name."""
    folders = {path.parent for path in TESTS.rglob("*.py")}
    assert [str(f.relative_to(TESTS)) for f in folders if not (f / "__init__.py").is_file()] == []
