"""Atomic checkpoints, RNG capture, labels, epoch orders and DDP shards (meta sampling: tests/test_sampling.py)."""

import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from metapeft.atomic_files import load_checkpoint, rng_state, save_checkpoint, save_safetensors, set_rng_state
from metapeft.data.sampling import dataset_labels, epoch_batches, shard_bounds
from tests.helpers.toy import LongTailedBlobs


def test_checkpoint_roundtrip_and_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint({"w": torch.arange(3.0), "step": 4, "nested": {"a": [1, 2]}}, path)
    state = load_checkpoint(path)
    assert torch.equal(state["w"], torch.arange(3.0)) and state["step"] == 4 and state["nested"] == {"a": [1, 2]}

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"bad": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 4
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left behind


def test_weights_only_loading_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": random.Random(0)}, path)
    with pytest.raises(Exception, match="[Ww]eights"):
        load_checkpoint(path)


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_safetensors_export(tmp_path):
    save_safetensors({"a.b": torch.ones(2, 2)}, tmp_path / "w.safetensors", {"step": 3})
    assert torch.equal(load_file(tmp_path / "w.safetensors")["a.b"], torch.ones(2, 2))


def test_labels_from_targets_or_one_pass():
    with_targets, without = LongTailedBlobs([5, 2]), LongTailedBlobs([5, 2], with_targets=False)
    assert torch.equal(dataset_labels(with_targets), dataset_labels(without))
    assert dataset_labels(without).bincount().tolist() == [5, 2]


def test_epoch_batches_and_shards_partition():
    batches = epoch_batches(torch.arange(10, 20), 4, seed=1, epoch=2)
    assert [b.numel() for b in batches] == [4, 4, 2]
    assert torch.cat(batches).sort().values.tolist() == list(range(10, 20))
    assert torch.equal(torch.cat(batches), torch.cat(epoch_batches(torch.arange(10, 20), 4, seed=1, epoch=2)))
    assert not torch.equal(torch.cat(batches), torch.cat(epoch_batches(torch.arange(10, 20), 4, seed=1, epoch=3)))
    bounds = [shard_bounds(7, r, 3) for r in range(3)]
    assert bounds == [(0, 3), (3, 5), (5, 7)]
