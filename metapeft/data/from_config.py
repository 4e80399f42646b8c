"""Datasets from the ``data:`` section of a training config (the ``metapeft`` CLI's yaml files).

Keys (``kind`` decides which apply):

| key | kinds | meaning |
|---|---|---|
| ``kind`` | all | ``index`` (authors' layout), ``folder`` (ImageFolder trees), ``cifar100_lt`` |
| ``root`` | all | dataset root folder (relative paths resolve against ``base_dir``) |
| ``train`` / ``test`` | index, folder | index files (index) or sub-folders (folder) of the two splits |
| ``split`` | index, folder | built-in (``dota``, ``fusrs_v2.5``, ``fusrs_v1.7``) or a split yaml (ours or authors') |
| ``classnames`` | index, folder | ``classnames.txt`` (line i names label i); default beside the split yaml, then root |
| ``imbalance`` / ``subset_seed`` | cifar100_lt | imbalance factor (default 100) and which images the subset keeps |
| ``image_size`` / ``resize`` | all | crop size (default 224) and the test-time resize (default 256 at 224) |

Without ``split``, the groups come from the training counts (many > 100, medium 20-100, few < 20 images) and the class
names from ``classnames`` (or ``root/classnames.txt``) when there is one, else the labels themselves.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from metapeft.data.cifar import CIFAR100LT
from metapeft.data.folder import image_folder
from metapeft.data.index import IndexDataset
from metapeft.data.splits import CLASSNAMES_FILE, ClassSplit, class_split, read_classnames
from metapeft.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from metapeft.metrics import class_split_from_counts

KINDS = ("index", "folder", "cifar100_lt")
KEYS = {"kind", "root", "train", "test", "split", "classnames", "imbalance", "subset_seed", "image_size", "resize"}


@dataclass
class DataBundle:
    """A training set, a test set (items ``(image (3, H, W) float32, label)``) and their :class:`ClassSplit`;
    ``train_eval`` is the training set under the test transform (un-augmented, same order and labels): for the
    cosine head's class-mean initialisation and for evaluating on training images."""

    train: Dataset
    test: Dataset
    split: ClassSplit
    train_eval: Dataset


def with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of ``dataset`` (one with a ``transform`` attribute applied in ``__getitem__``: IndexDataset,
    ImageFolder, CIFAR100LT) whose items go through ``transform`` instead; the image lists are shared."""
    if not hasattr(dataset, "transform"):
        raise TypeError(f"{type(dataset).__name__} has no 'transform' attribute to replace")
    twin = copy.copy(dataset)
    twin.transform = transform
    return twin


def _split_from_counts(name: str, classes, labels) -> ClassSplit:
    counts = [0] * len(classes)
    for label in labels:
        counts[label] += 1
    return ClassSplit(name, tuple(classes), class_split_from_counts(counts))


def _number(data: dict, key: str, default, kind: type, minimum: float):
    """``data[key]`` (``default`` when absent) as an int (``kind=int``) or a finite number, at least ``minimum``;
    a ``ValueError`` naming ``data.<key>`` otherwise (``image_size: big``, ``true``, ``.inf``)."""
    value = data.get(key, default)
    if value is None and default is None:
        return None
    admitted = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, admitted) or not math.isfinite(value) or value < minimum:
        what = "an int" if kind is int else "a finite number"
        raise ValueError(f"data.{key} must be {what} >= {minimum}, got {value!r}")
    return kind(value)


def build_datasets(data: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD, base_dir: str | os.PathLike = ".") -> DataBundle:
    """Build the :class:`DataBundle` a ``data:`` config section describes (module docstring); ``mean``/``std``
    normalise for the backbone. Unknown keys and missing required keys raise a ``ValueError`` naming them."""
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise ValueError(f"unknown data config key(s) {unknown}; known: {sorted(KEYS)}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValueError(f"data.kind must be one of {KINDS}, got {kind!r}")
    required = ("root",) if kind == "cifar100_lt" else ("root", "train", "test")
    missing = [f"data.{key}" for key in required if data.get(key) is None]
    if missing:
        raise ValueError(f"data.kind={kind!r} needs {', '.join(missing)}")
    root = Path(base_dir, os.path.expanduser(str(data["root"])))
    size, resize = _number(data, "image_size", 224, int, 1), _number(data, "resize", None, int, 1)
    train_tf = build_transforms(True, size, mean, std, resize)
    test_tf = build_transforms(False, size, mean, std, resize)
    if kind == "cifar100_lt":
        imbalance, seed = _number(data, "imbalance", 100, float, 1), _number(data, "subset_seed", 0, int, 0)
        train = CIFAR100LT(root, "train", imbalance, train_tf, seed)
        test = CIFAR100LT(root, "test", imbalance, test_tf, seed)
        return DataBundle(train, test, ClassSplit(f"CIFAR-100-LT (imbalance {imbalance:g})", tuple(train.classes),
                                                  train.class_split), with_transform(train, test_tf))
    classnames = None if data.get("classnames") is None else Path(base_dir, os.path.expanduser(str(data["classnames"])))
    split = None if data.get("split") is None else class_split(_resolve_spec(data["split"], base_dir), classnames, root)
    if kind == "index":
        names = split.classes if split else _index_classnames(classnames, root)
        num_classes = None if names is None else len(names)
        train = IndexDataset(root, data["train"], train_tf, num_classes)
        test = IndexDataset(root, data["test"], test_tf, num_classes)
        classes = names or tuple(str(c) for c in range(max(train.targets + test.targets) + 1))
    else:
        train, test = image_folder(root / data["train"], train_tf), image_folder(root / data["test"], test_tf)
        if train.classes != test.classes:
            raise ValueError(f"train and test folders under {root} hold different classes: "
                             f"{train.classes} != {test.classes}")
        classes = tuple(train.classes)
        if split is not None and tuple(split.classes) != classes:
            raise ValueError(f"class split {split.name!r} lists classes {list(split.classes)}, but the folders "
                             f"under {root / data['train']} are {list(classes)} (sorted sub-folder names)")
    return DataBundle(train, test, split or _split_from_counts(str(root.name), classes, train.targets),
                      with_transform(train, test_tf))


def _index_classnames(classnames: Path | None, root: Path) -> tuple[str, ...] | None:
    """Class names of an index dataset without a split file: ``data.classnames``, else ``root/classnames.txt``."""
    if classnames is None and (root / CLASSNAMES_FILE).is_file():
        classnames = root / CLASSNAMES_FILE
    return None if classnames is None else read_classnames(classnames)


def _resolve_spec(spec: str, base_dir: str | os.PathLike) -> str:
    """A split given as a relative yaml path resolves against the config's folder; built-in names stay."""
    spec = os.path.expanduser(str(spec))
    candidate = Path(base_dir, spec)
    return str(candidate) if spec.endswith((".yaml", ".yml")) and candidate.exists() else spec
