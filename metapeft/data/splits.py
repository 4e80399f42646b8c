"""Class names and many / medium / few (or head / tail) groups: the authors' yaml files and the built-in splits.

A split file is a yaml mapping::

    name: DOTA                      # optional
    classes: [plane, baseball-diamond, ...]   # label i of the index files is classes[i]
    many: [ship, large-vehicle, small-vehicle]
    medium: [plane, harbor, ...]
    few: [helicopter, ...]

Every key other than ``name`` and ``classes`` is a group; its entries are class names or integer labels. A class may
be in at most one group. Errors name the file and the line of the offending entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from metapeft.data.index import DataFormatError

DOTA_CLASSES = ("plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle", "ship",
                "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout", "harbor",
                "swimming-pool", "helicopter")


@dataclass(frozen=True)
class ClassSplit:
    """Class names (label i -> ``classes[i]``) and named groups of labels (``{"many": [6, 5, 4], ...}``)."""

    name: str
    classes: tuple[str, ...]
    groups: dict[str, list[int]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# The paper's splits (docs/method.md, "Data and metrics"). Order: DOTA v1.0's official category order; FUSRS in the
# order listed there. Placing FUSRS v1.7's extra "other" class in the head group is this project's choice (the
# paper names only v2.5's groups); pass your own split yaml to change it.
BUILTIN_SPLITS = {
    "dota": ClassSplit("DOTA", DOTA_CLASSES, {
        "many": ["ship", "large-vehicle", "small-vehicle"],
        "medium": ["plane", "harbor", "storage-tank", "tennis-court", "bridge", "swimming-pool"],
        "few": ["helicopter", "soccer-ball-field", "roundabout", "basketball-court", "baseball-diamond",
                "ground-track-field"],
    }),
    "fusrs_v2.5": ClassSplit("FUSRS v2.5", ("cargo", "fishing", "tanker", "dredger"), {
        "head": ["cargo", "fishing"], "tail": ["tanker", "dredger"],
    }),
    "fusrs_v1.7": ClassSplit("FUSRS v1.7", ("cargo", "fishing", "tanker", "dredger", "other"), {
        "head": ["cargo", "fishing", "other"], "tail": ["tanker", "dredger"],
    }),
}


def _resolve(split: ClassSplit) -> ClassSplit:
    """Built-in splits are written with names; turn their groups into label lists."""
    index = {name: i for i, name in enumerate(split.classes)}
    groups = {group: [index[c] for c in members] for group, members in split.groups.items()}
    return ClassSplit(split.name, split.classes, groups)


def builtin_split(name: str) -> ClassSplit:
    """One of :data:`BUILTIN_SPLITS` (``"dota"``, ``"fusrs_v2.5"``, ``"fusrs_v1.7"``)."""
    if name not in BUILTIN_SPLITS:
        raise ValueError(f"unknown built-in class split {name!r}; choose one of {sorted(BUILTIN_SPLITS)} "
                         "or give the path of a split yaml file")
    return _resolve(BUILTIN_SPLITS[name])


def _where(path: str, node: yaml.Node) -> str:
    return f"{path}:{node.start_mark.line + 1}"


def _scalars(path: str, node: yaml.Node, what: str) -> list[yaml.ScalarNode]:
    if not isinstance(node, yaml.SequenceNode) or not all(isinstance(n, yaml.ScalarNode) for n in node.value):
        raise DataFormatError(f"{_where(path, node)}: {what} must be a list of names or integer labels")
    return node.value


def read_class_split(path: str | os.PathLike) -> ClassSplit:
    """Parse a split yaml (module docstring) into a :class:`ClassSplit`; :class:`DataFormatError` with
    ``file:line`` for bad yaml, a missing ``classes`` list, unknown or repeated classes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class split file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            root = yaml.compose(handle)
        except yaml.MarkedYAMLError as error:
            line = error.problem_mark.line + 1 if error.problem_mark else "?"
            raise DataFormatError(f"{path}:{line}: invalid yaml: {error.problem}") from None
    if not isinstance(root, yaml.MappingNode):
        raise DataFormatError(f"{path}:1: a class split file must be a mapping with 'classes' and group lists")
    fields = {key.value: (key, value) for key, value in root.value}
    if "classes" not in fields:
        raise DataFormatError(f"{path}:1: missing the 'classes' list (label i -> classes[i])")
    class_nodes = _scalars(path, fields["classes"][1], "'classes'")
    classes = tuple(str(n.value) for n in class_nodes)
    for i, node in enumerate(class_nodes):
        if classes.index(classes[i]) != i:
            raise DataFormatError(f"{_where(path, node)}: class {classes[i]!r} is listed twice in 'classes'")
    if not classes:
        raise DataFormatError(f"{_where(path, fields['classes'][1])}: 'classes' is empty")
    name_node = fields.get("name", (None, None))[1]
    name = str(name_node.value) if isinstance(name_node, yaml.ScalarNode) else os.path.basename(path)
    groups, owner = {}, {}
    for group, (_, value_node) in fields.items():
        if group in ("name", "classes"):
            continue
        labels = []
        for node in _scalars(path, value_node, f"group {group!r}"):
            label = _label(path, node, classes)
            if label in owner:
                raise DataFormatError(f"{_where(path, node)}: class {classes[label]!r} is in group {group!r} and "
                                      f"already in group {owner[label]!r}")
            owner[label] = group
            labels.append(label)
        groups[group] = labels
    if not groups:
        raise DataFormatError(f"{path}:1: no groups (e.g. many/medium/few or head/tail) are listed")
    return ClassSplit(name, classes, groups)


def _label(path: str, node: yaml.ScalarNode, classes: tuple[str, ...]) -> int:
    text = str(node.value)
    if text in classes:
        return classes.index(text)
    if text.lstrip("-").isdigit():
        label = int(text)
        if 0 <= label < len(classes):
            return label
        raise DataFormatError(f"{_where(path, node)}: label {label} is outside [0, {len(classes)})")
    raise DataFormatError(f"{_where(path, node)}: unknown class {text!r} (classes: {', '.join(classes)})")


def class_split(spec: str | os.PathLike) -> ClassSplit:
    """A built-in split by name (``"dota"``, ...) or a split yaml by path."""
    spec = os.fspath(spec)
    if spec in BUILTIN_SPLITS:
        return builtin_split(spec)
    if spec.endswith((".yaml", ".yml")) or os.path.exists(spec):
        return read_class_split(spec)
    return builtin_split(spec)
