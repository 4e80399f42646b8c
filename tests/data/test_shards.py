"""Shards: the ranks' slices of every kind of loading, put together, are the whole batch or dataset in order; a
meta step's samples exclude what its look-ahead uses."""

import pytest
import torch
from torch.utils.data import TensorDataset

from metapeft.data.sampling import MetaSetSampler, MetaStepSamples
from metapeft.data.shards import Shards

DATASET = TensorDataset(torch.arange(22, dtype=torch.float64).reshape(11, 2), torch.arange(11) % 3)


def ranks(world_size: int) -> list[Shards]:
    return [Shards(rank, world_size, torch.device("cpu"), torch.float32) for rank in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_the_ranks_slices_of_a_batch_are_the_batch(world_size):
    indices = torch.tensor([7, 2, 9, 0, 5])
    empty = (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    pieces = [shards.collate(DATASET, indices, empty) for shards in ranks(world_size)]
    x, y = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x, DATASET.tensors[0][indices].float()) and torch.equal(y, DATASET.tensors[1][indices])


@pytest.mark.parametrize("world_size", [1, 3])
def test_an_epoch_loader_gives_each_rank_its_slice_of_every_batch(world_size):
    batches = [torch.tensor([3, 1, 4]), torch.tensor([10]), torch.tensor([5, 9, 2, 6])]
    per_rank = [[shards.local(loaded, b) for loaded, b in zip(shards.epoch_loader(DATASET, batches, 0, 0), batches)]
                for shards in ranks(world_size)]
    for step, indices in enumerate(batches):
        x = torch.cat([per_rank[rank][step][0] for rank in range(world_size)])
        assert torch.equal(x, DATASET.tensors[0][indices].float())


def test_the_dataset_loaders_cover_the_dataset_once():
    seen = []
    for shards in ranks(3):
        loader, first = shards.dataset_loader(DATASET, batch_size=2)
        x = torch.cat([batch[0] for batch in loader])
        assert torch.equal(x, DATASET.tensors[0][first:first + len(x)])
        seen.append(x)
    assert torch.equal(torch.cat(seen), DATASET.tensors[0])


def test_a_meta_batch_excludes_the_lookahead_batches():
    labels = torch.arange(60) % 3
    samples = MetaStepSamples(None, torch.arange(60), None, MetaSetSampler(labels, 0.5, 8, 0, resample=True), 0, 10)
    batch = torch.arange(10)
    extra = samples.lookahead(batch, 2, outer_step=4)
    assert [len(b) for b in extra] == [10, 10] and not torch.isin(torch.cat(extra), batch).any()
    meta = samples.meta_batch(4, torch.cat([batch, *extra]))
    assert len(meta) == 8 and not torch.isin(meta, torch.cat([batch, *extra])).any()
    assert samples.lookahead(batch, 0, outer_step=4) == []
