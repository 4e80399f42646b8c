"""The authors' dataset layout: a root folder of images and one index file per split.

Each non-empty line of an index file is ``relative/path.jpg label``: a path relative to the root (it may contain
spaces; the label is the last whitespace-separated field) and an integer class label ``>= 0``. Lines starting with
``#`` are comments. Every problem is reported with ``file:line``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from metapeft.data.images import ImageDecodeError, load_image


class DataFormatError(ValueError):
    """A malformed dataset file; the message starts with ``file:line:`` where a line is known."""


def read_index(path: str | os.PathLike, num_classes: int | None = None) -> list[tuple[str, int]]:
    """Parse an index file into ``[(relative path, label), ...]`` in file order.

    ``num_classes``: when given, every label must lie in ``[0, num_classes)``. Raises ``FileNotFoundError`` for a
    missing file and :class:`DataFormatError` (``file:line: ...``) for a malformed line or an empty index.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"index file {path} does not exist")
    entries = []
    with open(path, encoding="utf-8") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.rsplit(maxsplit=1)
            if len(fields) != 2:
                raise DataFormatError(f"{path}:{line_number}: expected '<relative/path> <integer label>', "
                                      f"got {line!r}")
            relative, label_text = fields
            try:
                label = int(label_text)
            except ValueError:
                raise DataFormatError(f"{path}:{line_number}: label {label_text!r} is not an integer "
                                      f"(line {line!r})") from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                bound = "" if num_classes is None else f" and < {num_classes} (the number of classes)"
                raise DataFormatError(f"{path}:{line_number}: label {label} must be >= 0{bound}")
            if os.path.isabs(relative):
                raise DataFormatError(f"{path}:{line_number}: image path {relative!r} must be relative to the root")
            entries.append((relative, label))
    if not entries:
        raise DataFormatError(f"{path}: the index lists no images")
    return entries


class IndexDataset(Dataset):
    """Images listed by an index file (:func:`read_index`) under ``root``; items are ``(transform(image), label)``.

    Args:
        root: the folder the index's relative paths start from.
        index_file: the split's index file (absolute, or relative to ``root`` when not found as given).
        transform: applied to the RGB ``PIL.Image`` (e.g. :func:`metapeft.data.build_transforms`); None returns
            the image itself.
        num_classes: when given, labels must lie in ``[0, num_classes)``.
        check_files: check at construction that every listed image exists (missing ones are reported with
            ``index:line``); images that exist but fail to decode raise :class:`ImageDecodeError` with their path
            when read (see :meth:`verify` for a full scan).

    ``targets`` holds the labels (a list, read by the trainer's samplers). Paths are kept in one NumPy string
    array, not a list of Python strings, so DataLoader workers forked from the main process share the memory
    instead of copying it page by page as reference counts change.
    """

    def __init__(self, root: str | os.PathLike, index_file: str | os.PathLike,
                 transform: Callable | None = None, num_classes: int | None = None, check_files: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} is not a directory")
        index_path = Path(index_file)
        if not index_path.is_file() and not index_path.is_absolute() and (self.root / index_path).is_file():
            index_path = self.root / index_path
        self.index_file = index_path
        entries = read_index(index_path, num_classes)
        if check_files:
            missing = [(n, rel) for n, (rel, _) in enumerate(entries) if not (self.root / rel).is_file()]
            if missing:
                lines = _line_numbers(index_path)
                shown = "; ".join(f"{index_path}:{lines[n]}: {self.root / rel}" for n, rel in missing[:5])
                more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
                raise FileNotFoundError(f"{len(missing)} image(s) listed in {index_path} do not exist: {shown}{more}")
        self.paths = np.array([rel for rel, _ in entries])
        self.targets = [label for _, label in entries]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = load_image(self.root / str(self.paths[index]))
        return (image if self.transform is None else self.transform(image)), self.targets[index]

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """Images per class: (C,) int64, C = ``num_classes`` or the largest label + 1."""
        return torch.bincount(torch.tensor(self.targets), minlength=num_classes or 0)

    def verify(self) -> list[ImageDecodeError]:
        """Decode every image once; returns the failures (each names its path), empty when all decode."""
        failures = []
        for relative in self.paths:
            try:
                load_image(self.root / str(relative))
            except ImageDecodeError as error:
                failures.append(error)
        return failures


def _line_numbers(path: Path) -> list[int]:
    """The 1-based line number of each entry of an index file (entries in :func:`read_index` order)."""
    with open(path, encoding="utf-8") as handle:
        return [n for n, raw in enumerate(handle, start=1) if raw.strip() and not raw.strip().startswith("#")]
