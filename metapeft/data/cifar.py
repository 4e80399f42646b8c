"""CIFAR-100-LT: an exponentially imbalanced subset of a local CIFAR-100 python-format copy.

The imbalance profile (Cao et al., LDAM, 2019; the standard CIFAR-LT benchmark): class c keeps
``n_c = floor(n_max * imbalance ** (-c / (C - 1)))`` training images, so class 0 keeps ``n_max`` and the last class
``n_max / imbalance``. For CIFAR-100 (``n_max = 500``) and imbalance 100 that is 500 ... 5, 10,847 images in all.
The test set stays balanced (100 per class). Groups: many > 100, medium 20-100, few < 20 training images.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from metapeft.data.index import DataFormatError
from metapeft.metrics import class_split_from_counts


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Images kept per class under the exponential profile (module docstring); ``imbalance >= 1``."""
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1 (largest / smallest class size), got {imbalance}")
    if num_classes < 2 or n_max < 1:
        raise ValueError(f"need num_classes >= 2 and n_max >= 1, got {num_classes}, {n_max}")
    return [int(math.floor(n_max * imbalance ** (-c / (num_classes - 1)) + 1e-9)) for c in range(num_classes)]


def long_tail_indices(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """Sorted indices keeping ``counts[c]`` images of each class c, drawn at random (``seed``) from ``labels`` (n,)."""
    rng = np.random.default_rng(seed)
    kept = []
    for c, count in enumerate(counts):
        members = np.flatnonzero(labels == c)
        if members.size < count:
            raise ValueError(f"class {c} has {members.size} images, fewer than the {count} the profile keeps")
        kept.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(kept))


def _cifar_folder(root: str | os.PathLike) -> Path:
    root = Path(root)
    for candidate in (root / "cifar-100-python", root):
        if (candidate / "train").is_file() and (candidate / "test").is_file():
            return candidate
    raise FileNotFoundError(f"no CIFAR-100 python-format copy under {root}: expected {root}/cifar-100-python/"
                            "{train,test,meta} (the extracted cifar-100-python.tar.gz)")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataFormatError(f"{path}: not a CIFAR python-format pickle ({error})") from error


class CIFAR100LT(Dataset):
    """CIFAR-100 (``split="test"``) or its long-tailed training subset (``split="train"``).

    Args:
        root: folder holding ``cifar-100-python/`` (or that folder itself); nothing is downloaded.
        split: ``"train"`` (imbalanced by ``imbalance``) or ``"test"`` (balanced, untouched).
        imbalance: largest / smallest training class size (100, 50, 10 in the literature; 1 keeps all).
        transform: applied to each 32x32 RGB ``PIL.Image``.
        seed: which images of each class the subset keeps.

    Attributes: ``targets`` (labels), ``classes`` (fine label names), ``train_counts`` (images per class of the
    long-tailed training set, also for ``split="test"``) and ``class_split`` (many / medium / few from those counts).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", imbalance: float = 100.0,
                 transform: Callable | None = None, seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        folder = _cifar_folder(root)
        train = _unpickle(folder / "train")
        train_labels = np.asarray(train[b"fine_labels"], dtype=np.int64)
        num_classes = int(train_labels.max()) + 1
        per_class = np.bincount(train_labels, minlength=num_classes)
        self.train_counts = long_tail_counts(int(per_class.max()), num_classes, imbalance)
        self.class_split = class_split_from_counts(self.train_counts)
        meta_path = folder / "meta"
        names = _unpickle(meta_path).get(b"fine_label_names") if meta_path.is_file() else None
        self.classes = [n.decode() for n in names] if names else [str(c) for c in range(num_classes)]
        if split == "train":
            data, labels = train[b"data"], train_labels
            keep = long_tail_indices(labels, self.train_counts, seed)
        else:
            test = _unpickle(folder / "test")
            data, labels = test[b"data"], np.asarray(test[b"fine_labels"], dtype=np.int64)
            keep = np.arange(labels.size)
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.size:
            raise DataFormatError(f"{folder / split}: expected data (n, 3072) uint8 for {labels.size} labels, "
                                  f"got {data.shape}")
        self.images = data[keep].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        self.targets = labels[keep].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (image if self.transform is None else self.transform(image)), self.targets[index]

    def class_counts(self) -> torch.Tensor:
        """Images per class in this split: (100,) int64."""
        return torch.bincount(torch.tensor(self.targets), minlength=len(self.classes))
