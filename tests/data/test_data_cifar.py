"""CIFAR-100-LT class counts for given imbalance factors, on a fake local python-format copy; the demo's digits."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from metapeft.data import CIFAR100LT, DataFormatError, digits_tasks, long_tail_counts, long_tail_indices


@pytest.mark.parametrize("imbalance, total", [(100, 10847), (50, 12608), (10, 19573)])
def test_long_tail_counts_match_the_standard_cifar100_lt_sizes(imbalance, total):
    counts = long_tail_counts(500, 100, imbalance)
    assert sum(counts) == total
    assert counts[0] == 500 and counts[-1] == 500 // imbalance
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    for c in (1, 37, 98):
        assert counts[c] == math.floor(500 * (1 / imbalance) ** (c / 99))


def test_long_tail_counts_errors_and_balanced():
    assert long_tail_counts(7, 3, 1) == [7, 7, 7]
    with pytest.raises(ValueError, match="imbalance must be >= 1"):
        long_tail_counts(10, 10, 0.5)
    with pytest.raises(ValueError, match="fewer than"):
        long_tail_indices(np.array([0, 0, 1]), [1, 2])


def fake_cifar(root, per_class=30, test_per_class=3, seed=0):
    """A python-format CIFAR-100 copy with random pixels; image i of class c has pixel [0] = i % 256."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), count)
        rng.shuffle(labels)
        data = rng.integers(0, 256, size=(labels.size, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist()}, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, handle)
    return folder


def test_cifar100_lt_counts_split_and_images(tmp_path):
    fake_cifar(tmp_path)
    train = CIFAR100LT(tmp_path, "train", imbalance=10)
    expected = long_tail_counts(30, 100, 10)
    assert train.class_counts().tolist() == expected == train.train_counts
    assert len(train) == sum(expected) and train.classes[:2] == ["c0", "c1"]
    many, medium, few = (train.class_split[g] for g in ("many", "medium", "few"))
    assert many == [] and medium == [c for c, n in enumerate(expected) if n >= 20]
    assert few == [c for c, n in enumerate(expected) if n < 20] and len(medium) + len(few) == 100
    with open(tmp_path / "cifar-100-python" / "train", "rb") as handle:
        raw = pickle.load(handle)
    image, label = train[5]
    source = np.asarray(raw[b"data"])[[i for i, y in enumerate(raw[b"fine_labels"])]]
    matches = np.flatnonzero((source == np.asarray(image).transpose(2, 0, 1).reshape(-1)).all(1))
    assert matches.size == 1 and raw[b"fine_labels"][matches[0]] == label
    test = CIFAR100LT(tmp_path / "cifar-100-python", "test", imbalance=10)
    assert test.class_counts().tolist() == [3] * 100 and test.train_counts == expected
    assert torch.equal(torch.tensor(CIFAR100LT(tmp_path, "train", 10, seed=0).targets), torch.tensor(train.targets))


def test_cifar100_lt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-100 python-format copy"):
        CIFAR100LT(tmp_path)
    folder = fake_cifar(tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        CIFAR100LT(tmp_path, "val")
    (folder / "test").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="test: not a CIFAR python-format pickle"):
        CIFAR100LT(tmp_path, "test")


def test_digits_tasks_profile_and_disjoint_splits():
    tasks = digits_tasks(imbalance=10, test_per_class=30)
    assert tasks.target_counts == long_tail_counts(tasks.target_counts[0], 10, 10)
    assert torch.bincount(torch.tensor(tasks.target_train.targets)).tolist() == tasks.target_counts
    assert torch.bincount(torch.tensor(tasks.target_test.targets)).tolist() == [30] * 10
    assert tasks.source_train.images.shape[1:] == (1, 8, 8)
    assert len(tasks.source_train) + len(tasks.source_test) + len(tasks.target_test) + tasks.target_counts[0] * 10 \
        <= 1797
    train_rows = {tuple(r) for r in tasks.target_train.images.flatten(1).tolist()}
    assert not train_rows & {tuple(r) for r in tasks.target_test.images.flatten(1).tolist()}
    assert abs(float(tasks.source_train.images.mean())) < 0.1
