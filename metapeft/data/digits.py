"""The demo's data: scikit-learn's bundled handwritten digits (1,797 real 8x8 grayscale images, 10 classes; no
download), split into a balanced *source* task and a long-tailed, domain-shifted *target* task.

- Each class's images are shuffled (``seed``) and halved: one half is the source pool, the other the target pool.
- source: the upright digits, balanced (~90 per class), for pre-training a backbone.
- target: a "remote-sensing-like" shift of the other half: rotated by 90 degrees (an overhead view has no upright)
  and multiplied by unit-mean gamma speckle (look number ``looks``), the multiplicative noise of SAR imagery.
  Its test split keeps ``test_per_class`` images of every class (balanced); its training split keeps
  ``long_tail_counts(n_max, 10, imbalance)`` images of class c (exponential profile, class 0 the head).
Pixels are scaled to [0, 1] and standardised with the source set's mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from metapeft.data.cifar import long_tail_counts, long_tail_indices


class TensorImageDataset(Dataset):
    """In-memory images (N, C, H, W) float32 and labels (N,) int64; items ``(image (C, H, W), int label)``;
    ``targets`` lists the labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"images must be (N, C, H, W) and labels (N,), got {tuple(images.shape)} and "
                             f"{tuple(labels.shape)}")
        self.images, self.labels = images.float().contiguous(), labels.long()
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


@dataclass
class DigitsTasks:
    """The demo's datasets: ``source_train`` / ``source_test`` (balanced, upright) and ``target_train`` (long-tailed)
    / ``target_test`` (balanced), both shifted; ``target_counts`` are the target training images per class."""

    source_train: TensorImageDataset
    source_test: TensorImageDataset
    target_train: TensorImageDataset
    target_test: TensorImageDataset
    target_counts: list[int]


def shift_domain(images: np.ndarray, rng: np.random.Generator, looks: float = 4.0) -> np.ndarray:
    """The target domain of images (N, H, W) in [0, 1]: rotate 90 degrees, multiply by Gamma(looks, 1/looks)
    speckle (mean 1, variance 1/looks); clipped to [0, 1]."""
    rotated = np.rot90(images, k=1, axes=(1, 2))
    speckle = rng.gamma(looks, 1.0 / looks, size=rotated.shape)
    return np.clip(rotated * speckle, 0.0, 1.0)


def digits_tasks(imbalance: float = 10.0, test_per_class: int = 30, seed: int = 0, looks: float = 4.0) -> DigitsTasks:
    """Build :class:`DigitsTasks` (module docstring). The target training split's largest class keeps every image of
    its pool not used for testing (about 60); ``imbalance`` = largest / smallest class size."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float64) / 16.0, digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    source, target = [], []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        source.append(members[: members.size // 2])
        target.append(members[members.size // 2:])
    source_idx, target_idx = np.sort(np.concatenate(source)), np.sort(np.concatenate(target))
    n_max = min(t.size for t in target) - test_per_class
    if n_max < 2:
        raise ValueError(f"test_per_class={test_per_class} leaves no target training images")
    target_test_idx = np.sort(np.concatenate([t[:test_per_class] for t in target]))
    target_pool = np.sort(np.concatenate([t[test_per_class:] for t in target]))
    counts = long_tail_counts(n_max, 10, imbalance)
    target_train_idx = target_pool[long_tail_indices(labels[target_pool], counts, seed)]

    source_images = images[source_idx]
    mean, std = source_images.mean(), source_images.std()
    shifted = dict(zip(target_idx.tolist(), shift_domain(images[target_idx], rng, looks)))

    def make(index: np.ndarray, shift: bool) -> TensorImageDataset:
        pixels = np.stack([shifted[i] for i in index.tolist()]) if shift else images[index]
        tensor = torch.from_numpy((pixels - mean) / std).float().unsqueeze(1)
        return TensorImageDataset(tensor, torch.from_numpy(labels[index]))

    # Source test images: a tenth of the source pool, per class; the rest pre-trains.
    source_test_idx = np.sort(np.concatenate([s[: s.size // 10] for s in source]))
    source_train_idx = np.setdiff1d(source_idx, source_test_idx)
    return DigitsTasks(make(source_train_idx, False), make(source_test_idx, False), make(target_train_idx, True),
                       make(target_test_idx, True), counts)
