"""Reading samples under fixed random states: augmentations that depend on the sample, not on the reader.

A DataLoader worker draws its augmentations from its own generators, seeded once per worker, so which worker reads a
sample (and what that worker read before) decides its augmentation; a run resumed mid-epoch hands the remaining
batches to its workers in a different order than the uninterrupted run did. :class:`SeededSamples` seeds Python's,
NumPy's and torch's CPU generators from ``(seed, epoch, index)`` before each read, so every sample gets the same
augmentation whichever worker reads it, whenever it is read. :func:`item_digest` reads a sample the same way to
fingerprint a dataset's content.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset


def sample_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (blake2b of their decimal text)."""
    text = "/".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators seeded with ``seed`` inside the block and restored after it."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededSamples(Dataset):
    """``dataset`` with item ``i`` read under :func:`seeded_generators` of ``(seed, epoch, i)`` (module docstring).

    Args:
        dataset: a map-style dataset whose random transforms draw from Python's ``random``, NumPy's or torch's CPU
            generator (torchvision's and timm's do).
        seed: the run's seed.
        epoch: the epoch the items are read in (each epoch draws fresh augmentations).
    """

    def __init__(self, dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with seeded_generators(sample_seed(self.seed, self.epoch, index)):
            return self.dataset[index]


def item_digest(dataset, index: int) -> str:
    """sha256 (16 hex digits) of item ``index``'s image tensor (dtype, shape, bytes) and label, read under fixed
    generator states (augmented datasets give the same digest every time)."""
    with seeded_generators(0):
        x, y = dataset[index]
    x = torch.as_tensor(x).detach().cpu().contiguous()
    digest = hashlib.sha256(f"{x.dtype}:{tuple(x.shape)}:{int(y)}:".encode())
    digest.update(memoryview(x.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]
