"""This process's share of every batch: contiguous shards of global batches, collated and on the device.

A global batch of ``n`` training-set indices is split over ``world_size`` ranks by :func:`shard_bounds`; rank
``r`` loads, collates and computes only its slice. :class:`Shards` holds where this rank's slices go (its rank,
the device, the parameters' dtype) and makes the three kinds of loading the trainer does: an epoch's batches
(:meth:`Shards.epoch_loader`, samples read under :class:`~metapeft.data.seeded.SeededSamples`), the samples of
one batch (:meth:`Shards.collate`: the meta step's look-ahead and meta batches) and a contiguous slice of a whole
dataset (:meth:`Shards.dataset_loader`: evaluation and head initialisation). Every loader has its own generator,
so the global RNG stays untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset, default_collate

from metapeft.data.sampling import LOADER, generator_for, shard_bounds
from metapeft.data.seeded import SeededSamples

Batch = tuple[torch.Tensor, torch.Tensor]


def batch_to_device(batch, device: torch.device, dtype: torch.dtype) -> Batch:
    """``(x, y)`` on ``device``: floating ``x`` cast to the parameters' ``dtype``, labels ``y`` as int64."""
    x, y = batch
    x = x.to(device, dtype=dtype if x.is_floating_point() else None, non_blocking=True)
    return x, y.to(device, non_blocking=True).long()


@dataclass(frozen=True)
class Shards:
    """Rank ``rank`` of ``world_size``: which slice of each batch it computes, on ``device`` with floating inputs in
    ``dtype``; ``num_workers`` DataLoader workers per loader."""

    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    num_workers: int = 0

    def bounds(self, length: int) -> tuple[int, int]:
        """[start, stop) of this rank's slice of ``length`` items (:func:`~metapeft.data.sampling.shard_bounds`)."""
        return shard_bounds(length, self.rank, self.world_size)

    def to_device(self, batch) -> Batch:
        """:func:`batch_to_device` to this rank's device and dtype."""
        return batch_to_device(batch, self.device, self.dtype)

    def _loader(self, dataset, **options) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, pin_memory=self.device.type == "cuda", **options)

    def collate(self, dataset, indices: torch.Tensor, empty: Batch) -> Batch:
        """This rank's slice of the samples ``dataset[indices]`` (indices (n,) int64), collated and on the device;
        ``empty`` (a zero-length batch of the right shapes) when the slice is empty."""
        start, stop = self.bounds(indices.numel())
        if stop == start:
            return empty
        return self.to_device(default_collate([dataset[int(i)] for i in indices[start:stop]]))

    def epoch_loader(self, dataset, batches: list[torch.Tensor], seed: int, epoch: int) -> DataLoader:
        """This rank's slices of ``batches`` (each (n,) int64 indices of ``dataset``), in order. A rank loads only
        the samples it computes on; an empty slice loads its batch's first sample, cut away by :meth:`local`.
        Each sample's augmentation is drawn from (seed, epoch, index): the same whichever worker reads it, so a run
        resumed mid-epoch (whose workers get the remaining batches in another order) reads what it would have."""
        slices = [b[slice(*self.bounds(len(b)))].tolist() or b[:1].tolist() for b in batches]
        return self._loader(SeededSamples(dataset, seed, epoch), batch_sampler=slices,
                            generator=generator_for(seed, LOADER, epoch))

    def local(self, loaded, batch_indices: torch.Tensor) -> Batch:
        """A batch from :meth:`epoch_loader` on the device: this rank's slice of the global batch ``batch_indices``
        (zero samples when the slice is empty)."""
        x, y = self.to_device(loaded)
        start, stop = self.bounds(len(batch_indices))
        return x[: stop - start], y[: stop - start]

    def dataset_loader(self, dataset, batch_size: int) -> tuple[DataLoader, int]:
        """This rank's contiguous slice of ``dataset`` in order, in batches of ``batch_size``, and the slice's first
        index (evaluation passes: an evaluation never changes what training draws next)."""
        start, stop = self.bounds(len(dataset))
        loader = self._loader(Subset(dataset, range(start, stop)), batch_size=batch_size,
                              generator=torch.Generator().manual_seed(0))
        return loader, start
