"""The layers of the package (docs/architecture.md): every import points to the same layer or one below it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Longest matching prefix wins. 0 kernels -> 1 ops -> 2 layers and foundations -> 3 model surgery
# -> 4 meta engine, trainer and run building -> 5 apps (and the package root, which re-exports everything).
LAYERS = {
    "kernels": 0, "metapeft._C": 0,
    "metapeft.ops": 1, "metapeft.modulator": 1, "metapeft.reference": 1,
    "metapeft.layers": 2, "metapeft.heads": 2, "metapeft.losses": 2, "metapeft.metrics": 2, "metapeft.data": 2,
    "metapeft.sampling": 2, "metapeft.checkpoint": 2,
    "metapeft.inject": 3, "metapeft.params": 3, "metapeft.io": 3, "metapeft.gamma": 3, "metapeft.backbones": 3,
    "metapeft.meta": 4, "metapeft.trainer": 4, "metapeft.config": 4, "metapeft.runs": 4, "metapeft.build": 4,
    "metapeft.cli": 5, "metapeft.demo": 5, "metapeft.sweep": 5, "metapeft.build_info": 5, "metapeft.__main__": 5,
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


SOURCES = sorted([*ROOT.joinpath("metapeft").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers(path):
    name = module_name(path)
    own = layer_of(name)
    assert own is not None, f"{name} has no layer: add it to LAYERS here and to docs/architecture.md"
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    upward = sorted(f"{target} (layer {layer_of(target)})" for target in imports(path, package)
                    if (layer_of(target) or 0) > own)
    assert not upward, f"{name} (layer {own}) imports upward: {upward}"
