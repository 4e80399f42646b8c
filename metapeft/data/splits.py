"""Class names and many / medium / few (or head / tail) groups: split yaml files, ``classnames.txt`` and built-ins.

Two split-file formats are read:

- the paper authors' ``lt_split_config.yaml``, as released: keys ``many_classes``, ``med_classes``, ``few_classes``
  (a key may be ``null``: that group is absent, e.g. FUSRS has no medium group), class names from a ``classnames.txt``
  (line i names label i; see :func:`read_classnames`)::

      many_classes: [ship, large-vehicle, small-vehicle]
      med_classes: [plane, harbor, ...]
      few_classes: [helicopter, ...]

- this project's own, with the class names inside::

      name: DOTA                      # optional
      classes: [baseball-diamond, basketball-court, ...]   # label i of the index files is classes[i]
      many: [ship, large-vehicle, small-vehicle]
      medium: [plane, harbor, ...]
      few: [helicopter, ...]

  Every key other than ``name`` and ``classes`` is a group.

Group entries are class names or integer labels. A class may be in at most one group. Errors name the file and the
line of the offending entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from metapeft.data.index import DataFormatError

# Label orders of the authors' released classnames.txt files: DOTA alphabetical (their index files give
# val/small-vehicle/... label 10), FUSRS in their listed order.
DOTA_CLASSES = ("baseball-diamond", "basketball-court", "bridge", "ground-track-field", "harbor", "helicopter",
                "large-vehicle", "plane", "roundabout", "ship", "small-vehicle", "soccer-ball-field", "storage-tank",
                "swimming-pool", "tennis-court")
FUSRS_V25_CLASSES = ("cargo", "fishing", "tanker", "dredger")
FUSRS_V17_CLASSES = ("cargo", "other", "fishing", "tanker", "dredger")
# the authors' lt_split_config.yaml keys -> our group names
AUTHOR_GROUP_KEYS = {"many_classes": "many", "med_classes": "medium", "few_classes": "few"}
CLASSNAMES_FILE = "classnames.txt"


@dataclass(frozen=True)
class ClassSplit:
    """Class names (label i -> ``classes[i]``) and named groups of labels (``{"many": [6, 5, 4], ...}``)."""

    name: str
    classes: tuple[str, ...]
    groups: dict[str, list[int]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# The paper's splits (docs/method.md, "Data and metrics") in the authors' label orders (DOTA_CLASSES ...). Placing
# FUSRS v1.7's extra "other" class in the head group is this project's choice (the paper names only v2.5's groups);
# pass a split yaml to change it.
BUILTIN_SPLITS = {
    "dota": ClassSplit("DOTA", DOTA_CLASSES, {
        "many": ["ship", "large-vehicle", "small-vehicle"],
        "medium": ["plane", "harbor", "storage-tank", "tennis-court", "bridge", "swimming-pool"],
        "few": ["helicopter", "soccer-ball-field", "roundabout", "basketball-court", "baseball-diamond",
                "ground-track-field"],
    }),
    "fusrs_v2.5": ClassSplit("FUSRS v2.5", FUSRS_V25_CLASSES, {
        "head": ["cargo", "fishing"], "tail": ["tanker", "dredger"],
    }),
    "fusrs_v1.7": ClassSplit("FUSRS v1.7", FUSRS_V17_CLASSES, {
        "head": ["cargo", "other", "fishing"], "tail": ["tanker", "dredger"],
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


def read_classnames(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from a ``classnames.txt``: line i (stripped) names label i; the last line may lack its newline and
    trailing blank lines are ignored. :class:`DataFormatError` with ``file:line`` for a blank line between names or a
    name given twice."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class names file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle.read().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataFormatError(f"{path}:1: the class names file is empty")
    first_line = {}
    for number, name in enumerate(lines, start=1):
        if not name:
            raise DataFormatError(f"{path}:{number}: blank line between class names (line i must name label i - 1)")
        if name in first_line:
            raise DataFormatError(f"{path}:{number}: class {name!r} is already named on line {first_line[name]}")
        first_line[name] = number
    return tuple(lines)


def find_classnames(split_path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> str:
    """The ``classnames.txt`` that goes with an authors'-format split file: beside it, else in ``data_root``.
    ``FileNotFoundError`` naming both places when neither has one."""
    candidates = [os.path.join(os.path.dirname(os.fspath(split_path)), CLASSNAMES_FILE)]
    if data_root is not None:
        candidates.append(os.path.join(os.fspath(data_root), CLASSNAMES_FILE))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{split_path} lists groups by class name (the authors' many_classes / med_classes / "
                            f"few_classes format) but no {CLASSNAMES_FILE} was found at {' or '.join(candidates)}; "
                            "set data.classnames to its path")


def _compose(path: str) -> yaml.MappingNode:
    with open(path, encoding="utf-8") as handle:
        try:
            root = yaml.compose(handle)
        except yaml.MarkedYAMLError as error:
            line = error.problem_mark.line + 1 if error.problem_mark else "?"
            raise DataFormatError(f"{path}:{line}: invalid yaml: {error.problem}") from None
    if not isinstance(root, yaml.MappingNode):
        raise DataFormatError(f"{path}:1: a class split file must be a mapping of groups (many_classes / "
                              "med_classes / few_classes, or classes plus group lists)")
    return root


def read_class_split(path: str | os.PathLike, classnames: str | os.PathLike | None = None,
                     data_root: str | os.PathLike | None = None) -> ClassSplit:
    """Parse a split yaml in either format (module docstring) into a :class:`ClassSplit`.

    The class names of an authors'-format file come from ``classnames`` when given, else from the
    ``classnames.txt`` :func:`find_classnames` locates (beside the yaml, then in ``data_root``); an own-format
    file carries its names. :class:`DataFormatError` with ``file:line`` for bad yaml, unknown keys, a missing
    ``classes`` list, unknown or repeated classes, labels out of range.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class split file {path} does not exist")
    root = _compose(path)
    fields = {key.value: (key, value) for key, value in root.value}
    if "classes" not in fields and set(fields) & set(AUTHOR_GROUP_KEYS):
        return _read_author_split(path, fields, classnames or find_classnames(path, data_root))
    if "classes" not in fields:
        raise DataFormatError(f"{path}:1: missing the 'classes' list (label i -> classes[i]), or the authors' "
                              f"{'/'.join(AUTHOR_GROUP_KEYS)} keys")
    class_nodes = _scalars(path, fields["classes"][1], "'classes'")
    classes = tuple(str(n.value) for n in class_nodes)
    for i, node in enumerate(class_nodes):
        if classes.index(classes[i]) != i:
            raise DataFormatError(f"{_where(path, node)}: class {classes[i]!r} is listed twice in 'classes'")
    if not classes:
        raise DataFormatError(f"{_where(path, fields['classes'][1])}: 'classes' is empty")
    name_node = fields.get("name", (None, None))[1]
    name = str(name_node.value) if isinstance(name_node, yaml.ScalarNode) else os.path.basename(path)
    group_nodes = {group: value for group, (_, value) in fields.items() if group not in ("name", "classes")}
    return ClassSplit(name, classes, _groups(path, group_nodes, classes))


def _read_author_split(path: str, fields: dict, classnames: str | os.PathLike) -> ClassSplit:
    unknown = [key for key in fields if key not in AUTHOR_GROUP_KEYS]
    if unknown:
        raise DataFormatError(f"{_where(path, fields[unknown[0]][0])}: unknown key {unknown[0]!r} in an authors'-"
                              f"format split file (keys: {', '.join(AUTHOR_GROUP_KEYS)})")
    classes = read_classnames(classnames)
    group_nodes = {AUTHOR_GROUP_KEYS[key]: value for key, (_, value) in fields.items()
                   if not (isinstance(value, yaml.ScalarNode) and value.tag == "tag:yaml.org,2002:null")}
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or os.path.basename(path)
    return ClassSplit(name, classes, _groups(path, group_nodes, classes, f" in {os.fspath(classnames)}"))


def _groups(path: str, group_nodes: dict[str, yaml.Node], classes: tuple[str, ...], names_from: str = ""
            ) -> dict[str, list[int]]:
    """Each group's labels; a class in two groups is an error naming both. ``names_from``: where the class names
    were read, for the messages."""
    groups, owner = {}, {}
    for group, value_node in group_nodes.items():
        labels = []
        for node in _scalars(path, value_node, f"group {group!r}"):
            label = _label(path, node, classes, names_from)
            if label in owner:
                raise DataFormatError(f"{_where(path, node)}: class {classes[label]!r} is in group {group!r} and "
                                      f"already in group {owner[label]!r}")
            owner[label] = group
            labels.append(label)
        groups[group] = labels
    if not groups:
        raise DataFormatError(f"{path}:1: no groups (e.g. many/medium/few or head/tail) are listed")
    return groups


def _label(path: str, node: yaml.ScalarNode, classes: tuple[str, ...], names_from: str = "") -> int:
    text = str(node.value)
    if text in classes:
        return classes.index(text)
    if text.lstrip("-").isdigit():
        label = int(text)
        if 0 <= label < len(classes):
            return label
        raise DataFormatError(f"{_where(path, node)}: label {label} is outside [0, {len(classes)})")
    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    raise DataFormatError(f"{_where(path, node)}: unknown class {text!r}: not one of the {len(classes)} class names"
                          f"{names_from} ({shown})")


def class_split(spec: str | os.PathLike, classnames: str | os.PathLike | None = None,
                data_root: str | os.PathLike | None = None) -> ClassSplit:
    """A built-in split by name (``"dota"``, ...) or a split yaml by path (:func:`read_class_split` with
    ``classnames`` and ``data_root``)."""
    spec = os.fspath(spec)
    if spec in BUILTIN_SPLITS:
        return builtin_split(spec)
    if spec.endswith((".yaml", ".yml")) or os.path.exists(spec):
        return read_class_split(spec, classnames, data_root)
    return builtin_split(spec)
