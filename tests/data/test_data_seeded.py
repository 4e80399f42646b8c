"""Samples read under generators seeded by (seed, epoch, index): the same augmentation whichever process reads them,
in whatever order, and the reader's own generators untouched."""

import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from metapeft.data.seeded import SeededSamples, item_digest


class Augmenting(torch.utils.data.Dataset):
    """Noise from torch, NumPy and Python's generators, as image transforms draw it."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        noise = torch.randn(3) + float(np.random.rand()) + random.random()
        return torch.full((3,), float(i)) + noise, i % 3


def test_items_are_the_same_in_any_order_and_any_worker():
    samples = SeededSamples(Augmenting(), seed=5, epoch=1)
    forward = torch.stack([samples[i][0] for i in range(12)])
    backward = torch.stack([samples[i][0] for i in reversed(range(12))]).flip(0)
    workers = torch.cat([x for x, _ in DataLoader(samples, batch_size=5, num_workers=2)])
    assert torch.equal(forward, backward) and torch.equal(forward, workers)
    assert not torch.equal(forward, torch.stack([SeededSamples(Augmenting(), 5, 2)[i][0] for i in range(12)]))


def test_reading_leaves_the_reader_s_generators_as_they_were():
    torch.manual_seed(1)
    expected = torch.rand(2)
    torch.manual_seed(1)
    SeededSamples(Augmenting(), seed=0, epoch=0)[3]
    assert torch.equal(torch.rand(2), expected)


def test_item_digest_is_stable_for_augmented_items_and_tells_items_apart():
    data = Augmenting()
    assert item_digest(data, 4) == item_digest(data, 4) != item_digest(data, 5)
