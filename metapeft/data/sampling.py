"""Deterministic sampling: epoch batch orders, stratified meta sets, a meta step's look-ahead and meta batches, DDP
shards.

Every draw comes from its own generator seeded by ``(seed, purpose, step)``, never from the global RNG,
so it is the same on every DDP rank, reproducible after a resume, and independent of what else consumed
random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EPOCH_ORDER, META_SET, META_BATCH, FIXED_SPLIT, LOADER = range(5)
LOOKAHEAD_BATCHES = 5


def generator_for(seed: int, purpose: int, step: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, purpose, step)`` via NumPy's SeedSequence (well mixed)."""
    state = np.random.SeedSequence([seed % 2**63, purpose, step]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def dataset_labels(dataset) -> torch.Tensor:
    """Integer labels (n,) of a map-style dataset: its ``targets`` attribute if present, else one pass over it."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    labels = torch.as_tensor(np.asarray(targets), dtype=torch.long).flatten()
    if labels.numel() != len(dataset):
        raise ValueError(f"dataset.targets has {labels.numel()} labels for {len(dataset)} samples")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("dataset labels must be >= 0")
    return labels


def _rank_within_class(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random order of ``labels`` (n,) grouped by class, and each entry's rank within its class."""
    order = torch.randperm(labels.numel(), generator=generator)
    order = order[torch.sort(labels[order], stable=True).indices]
    grouped = labels[order]
    starts = torch.searchsorted(grouped, grouped, right=False)
    return order, torch.arange(labels.numel()) - starts


def _take_per_class(pool: torch.Tensor, labels: torch.Tensor, quota: torch.Tensor, generator) -> torch.Tensor:
    """Indices from ``pool`` (n,), ``quota[c]`` random ones of each class c; sorted."""
    pool_labels = labels[pool]
    order, rank = _rank_within_class(pool_labels, generator)
    chosen = order[rank < quota[pool_labels[order]]]
    return pool[chosen].sort().values


def stratified_subset(pool: torch.Tensor, labels: torch.Tensor, ratio: float, generator) -> torch.Tensor:
    """A stratified ``ratio`` sample of the indices ``pool``: ``max(1, round(ratio * n_c))`` of each class
    with ``n_c >= 2`` members in the pool (so every such class reaches the meta set and keeps a training
    sample), none of classes with a single member. Returns sorted indices."""
    counts = torch.bincount(labels[pool], minlength=int(labels.max()) + 1 if labels.numel() else 0)
    quota = torch.where(counts >= 2, (counts.double() * ratio).round().long().clamp_min(1), 0)
    return _take_per_class(pool, labels, quota, generator)


META_SAMPLINGS = ("uniform", "class_balanced")


def uniform_batch(pool: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` indices of ``pool`` (n,) drawn uniformly at random without replacement (all of it if smaller), so
    class c's expected share is its share of the pool. Returns sorted indices."""
    if size >= pool.numel():
        return pool.sort().values
    return pool[torch.randperm(pool.numel(), generator=generator)[:size]].sort().values


def class_balanced_batch(pool: torch.Tensor, labels: torch.Tensor, size: int, generator: torch.Generator
                         ) -> torch.Tensor:
    """``size`` indices of ``pool`` (n,) with an equal expected share ``size / K`` for each of the K classes present:
    every class gets ``size // K`` slots and ``size % K`` classes chosen at random get one more. A class fills its
    slots from a random order of its members, cycling through that order again (drawing with replacement) when
    it has fewer members than slots, so each member of class c is drawn ``slots_c / n_c`` times in expectation.
    Returns sorted indices (with repeats where a class is smaller than its share)."""
    pool_labels = labels[pool]
    members = torch.bincount(pool_labels)
    present = members.nonzero().flatten()
    slots = torch.zeros_like(members)
    slots[present] = size // present.numel()
    slots[present[torch.randperm(present.numel(), generator=generator)[:size % present.numel()]]] += 1
    order, _ = _rank_within_class(pool_labels, generator)
    first_member = torch.cumsum(members, 0) - members
    slot_class = torch.repeat_interleave(torch.arange(members.numel()), slots)
    slot_rank = torch.arange(slot_class.numel()) - (torch.cumsum(slots, 0) - slots)[slot_class]
    return pool[order[first_member[slot_class] + slot_rank % members[slot_class]]].sort().values


class MetaSetSampler:
    """Where the meta batches come from (docs/method.md: a stratified ``ratio`` sample of the training set).

    Args:
        labels: (n,) labels of the meta source (the training set, or the validation set when one is given).
        ratio: meta-set fraction of the source (ignored for a separate validation set: all of it is the pool).
        batch_size: meta-batch size drawn from the meta set at every outer step.
        seed: base seed; every draw is a function of ``(seed, outer_step)`` only.
        resample: draw a fresh meta set at every outer step (the paper) or keep one fixed split.
        separate_source: True when ``labels`` belong to a separate validation set.
        sampling: how a meta batch is drawn from the meta set: ``"uniform"`` (:func:`uniform_batch`: every class
            in proportion to the meta set, over many steps) or ``"class_balanced"`` (:func:`class_balanced_batch`:
            an equal expected share per class). Both are random draws, so every class with a meta-set member
            reaches meta batches, and the class mix differs from step to step.

    With the training set as source and ``resample=False`` the fixed meta set is held out of the inner
    loop (:meth:`train_indices`); with ``resample=True`` the inner loop sees every sample and each outer
    step's meta set excludes that step's training batch, so L_val is measured on unseen samples.
    """

    def __init__(self, labels: torch.Tensor, ratio: float, batch_size: int, seed: int, resample: bool,
                 separate_source: bool = False, sampling: str = "uniform") -> None:
        if sampling not in META_SAMPLINGS:
            raise ValueError(f"sampling must be one of {META_SAMPLINGS}, got {sampling!r}")
        self.labels, self.ratio, self.batch_size, self.seed, self.sampling = labels, ratio, batch_size, seed, sampling
        self.resample, self.separate_source = resample, separate_source
        everything = torch.arange(labels.numel())
        if separate_source:
            self.fixed_set = everything
        elif not resample:
            self.fixed_set = stratified_subset(everything, labels, ratio, generator_for(seed, FIXED_SPLIT, 0))
        else:
            self.fixed_set = None
        if self.fixed_set is not None and self.fixed_set.numel() == 0:
            raise ValueError("the meta set is empty: the meta source needs at least one class with 2+ samples")

    def train_indices(self) -> torch.Tensor:
        """Training-set indices the inner loop iterates over (all but a fixed held-out meta set); only for a
        training-set meta source."""
        if self.separate_source:
            raise ValueError("the meta source is a separate set: the inner loop uses the whole training set")
        everything = torch.arange(self.labels.numel())
        if self.fixed_set is None:
            return everything
        keep = torch.ones(self.labels.numel(), dtype=torch.bool)
        keep[self.fixed_set] = False
        return everything[keep]

    def meta_batch(self, outer_step: int, train_batch: torch.Tensor | None = None) -> torch.Tensor:
        """Meta-batch indices (into the meta source) for outer step ``outer_step``; ``train_batch`` (training-set
        indices of this step) is excluded from a re-sampled meta set."""
        if self.fixed_set is not None:
            pool = self.fixed_set
        else:
            keep = torch.ones(self.labels.numel(), dtype=torch.bool)
            if train_batch is not None:
                keep[train_batch] = False
            pool = stratified_subset(torch.arange(self.labels.numel())[keep], self.labels, self.ratio,
                                     generator_for(self.seed, META_SET, outer_step))
            if pool.numel() == 0:
                raise ValueError(f"outer step {outer_step}: the re-sampled meta set is empty")
        generator = generator_for(self.seed, META_BATCH, outer_step)
        if self.sampling == "class_balanced":
            return class_balanced_batch(pool, self.labels, self.batch_size, generator)
        return uniform_batch(pool, self.batch_size, generator)


def epoch_batches(indices: torch.Tensor, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's global batches: a permutation of ``indices`` seeded by ``(seed, epoch)`` cut into
    ``batch_size`` chunks (the last one may be smaller)."""
    order = indices[torch.randperm(indices.numel(), generator=generator_for(seed, EPOCH_ORDER, epoch))]
    return list(order.split(batch_size))


def lookahead_batches(indices: torch.Tensor, exclude: torch.Tensor, count: int, batch_size: int, seed: int,
                      step: int) -> list[torch.Tensor]:
    """Training-set indices for the ``count`` extra look-ahead steps (2..K) of outer step ``step``: each batch
    ``batch_size`` indices drawn at random without replacement (all of the pool if smaller) from ``indices``
    minus ``exclude`` (the step's own batch), independently of each other, seeded by ``(seed, step)``."""
    pool = indices[~torch.isin(indices, exclude)]
    if pool.numel() == 0:
        raise ValueError(f"outer step {step}: no training sample is left for the look-ahead batches")
    generator = generator_for(seed, LOOKAHEAD_BATCHES, step)
    return [pool[torch.randperm(pool.numel(), generator=generator)[:batch_size]] for _ in range(count)]


def shard_bounds(length: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``length`` items (sizes differ by at most 1)."""
    base, extra = divmod(length, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class MetaStepSamples:
    """Where a meta step's samples come from: the extra look-ahead batches (steps 2..K) from ``train_indices``
    (the inner loop's indices into ``train_set``), the meta batch from ``sampler`` (indices into ``meta_source``:
    the training set, or a separate validation set). ``batch_size``: the look-ahead batches' size; every draw is a
    function of ``(seed, outer step)``."""

    train_set: object
    train_indices: torch.Tensor
    meta_source: object
    sampler: MetaSetSampler
    seed: int
    batch_size: int

    def lookahead(self, batch_indices: torch.Tensor, count: int, outer_step: int,
                  batch_size: int | None = None) -> list[torch.Tensor]:
        """``count`` look-ahead batches of outer step ``outer_step`` (:func:`lookahead_batches`), none of them
        holding the step's own batch ``batch_indices``; ``batch_size`` defaults to :attr:`batch_size`."""
        if count <= 0:
            return []
        return lookahead_batches(self.train_indices, batch_indices, count, batch_size or self.batch_size, self.seed,
                                 outer_step)

    def meta_batch(self, outer_step: int, seen: torch.Tensor) -> torch.Tensor:
        """The meta batch of outer step ``outer_step`` (indices into :attr:`meta_source`); a meta set drawn from the
        training set excludes ``seen`` (the training indices the step's look-ahead uses)."""
        return self.sampler.meta_batch(outer_step, None if self.sampler.separate_source else seen)
