"""Meta sets and meta batches (``metapeft.data.sampling``): random draws that reach every class, in the expected shares,
reproducible from ``(seed, outer step)``.

Statistical bound used below: over T independent outer steps, each drawing B of the M meta-set members without
replacement, the per-class counts X_c are a sum of multivariate hypergeometric vectors, so Pearson's statistic
``sum_c (X_c - T B p_c)^2 / (T B p_c)`` times ``(M - 1) / (M - B)`` is asymptotically chi-square with K - 1 degrees
of freedom (p_c = class c's share of the meta set, K classes). A test fails when its p-value is below 1e-3: with a
random seed an unbiased sampler would fail one run in a thousand; the seed here is fixed, so the outcome is
deterministic. The earlier largest-remainder meta batches (the same class mix at every step) fail by far: on the
CIFAR-100-LT counts below 44 classes were never drawn in 300 steps and the statistic was 4318 on 99 degrees of freedom.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from metapeft.data.cifar import long_tail_counts
from metapeft.data.sampling import (
    MetaSetSampler,
    class_balanced_batch,
    epoch_batches,
    stratified_subset,
    uniform_batch,
)

STEPS, RATIO, BATCH = 300, 0.2, 128


@pytest.fixture(autouse=True)
def _one_thread():
    """Index arithmetic on ~10^4 labels: one thread is ~30x faster than oversubscribed cores (measured 5 ms vs
    140 ms per meta batch on the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar_lt_labels() -> torch.Tensor:
    """Labels with CIFAR-100-LT's class sizes at imbalance 100 (500 ... 5 images, 10,847 in all)."""
    counts = long_tail_counts(500, 100, 100)
    return torch.repeat_interleave(torch.arange(100), torch.tensor(counts))


def meta_set_counts(labels: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per-class meta-set sizes of a stratified ``ratio`` sample: max(1, round(ratio * n_c)) for n_c >= 2."""
    counts = torch.bincount(labels)
    return torch.where(counts >= 2, (counts.double() * ratio).round().long().clamp_min(1), 0)


def hypergeometric_pvalue(observed: torch.Tensor, shares: torch.Tensor, draws: int, population: int,
                          steps: int) -> float:
    """p-value of the scaled Pearson statistic (module docstring) for per-class totals ``observed`` (K,) over
    ``steps`` steps of ``draws`` draws without replacement from ``population`` members with class ``shares`` (K,)."""
    expected = steps * draws * shares.double()
    statistic = float(((observed.double() - expected) ** 2 / expected).sum()) * (population - 1) / (population - draws)
    return float(chi2.sf(statistic, shares.numel() - 1))


@pytest.mark.parametrize("sampling", ["uniform", "class_balanced"])
def test_every_class_with_a_meta_set_member_reaches_meta_batches(cifar_lt_labels, sampling):
    labels = cifar_lt_labels
    sampler = MetaSetSampler(labels, RATIO, BATCH, seed=0, resample=True, sampling=sampling)
    train_batches = epoch_batches(torch.arange(labels.numel()), BATCH, seed=0, epoch=0)
    seen = torch.zeros(100, dtype=torch.bool)
    for step in range(STEPS):
        seen[labels[sampler.meta_batch(step, train_batches[step % len(train_batches)])]] = True
    assert meta_set_counts(labels, RATIO).gt(0).all()
    assert seen.all(), f"classes never drawn: {torch.nonzero(~seen).flatten().tolist()}"


def class_counts_per_step(labels: torch.Tensor, sampler: MetaSetSampler) -> torch.Tensor:
    """(STEPS, 100) int64: how many members of each class the meta batch of each outer step holds."""
    return torch.stack([torch.bincount(labels[sampler.meta_batch(step)], minlength=100) for step in range(STEPS)])


@pytest.mark.parametrize("resample", [True, False], ids=["resampled", "fixed"])
def test_uniform_meta_batches_follow_the_meta_set_shares(cifar_lt_labels, resample):
    sampler = MetaSetSampler(cifar_lt_labels, RATIO, BATCH, seed=1, resample=resample, sampling="uniform")
    counts = class_counts_per_step(cifar_lt_labels, sampler)
    assert counts.sum(1).eq(BATCH).all() and sampler.meta_batch(0).unique().numel() == BATCH
    quota = meta_set_counts(cifar_lt_labels, RATIO)
    assert hypergeometric_pvalue(counts.sum(0), quota / quota.sum(), BATCH, int(quota.sum()), STEPS) > 1e-3


@pytest.mark.parametrize("resample", [True, False], ids=["resampled", "fixed"])
def test_class_balanced_meta_batches_give_every_class_an_equal_share(cifar_lt_labels, resample):
    sampler = MetaSetSampler(cifar_lt_labels, RATIO, BATCH, seed=2, resample=resample, sampling="class_balanced")
    counts = class_counts_per_step(cifar_lt_labels, sampler)
    # 128 slots over 100 classes: one each plus 28 extra slots on 28 distinct random classes at every step
    assert counts.sum(1).eq(BATCH).all() and counts.min() == 1 and counts.max() == 2
    assert counts.eq(2).sum(1).eq(28).all()
    extras = counts.sum(0) - STEPS * (BATCH // 100)
    assert hypergeometric_pvalue(extras, torch.full((100,), 0.01), BATCH % 100, 100, STEPS) > 1e-3


def test_class_balanced_draws_with_replacement_only_where_a_class_is_smaller_than_its_share():
    labels = torch.tensor([0] * 3 + [1] * 100 + [2] * 7)
    pool = torch.arange(labels.numel())
    for seed in range(20):
        batch = class_balanced_batch(pool, labels, 15, torch.Generator().manual_seed(seed))
        per_member = torch.bincount(batch, minlength=labels.numel())
        assert per_member[:3].tolist() in ([2, 2, 1], [2, 1, 2], [1, 2, 2])  # 5 slots over 3 members
        assert per_member[3:103].sum() == 5 and per_member[3:103].max() == 1
        assert per_member[103:].sum() == 5 and per_member[103:].max() == 1


def test_class_balanced_spreads_the_remainder_over_random_classes():
    labels = torch.arange(40) % 4
    pool = torch.arange(40)
    mixes = {tuple(torch.bincount(labels[class_balanced_batch(pool, labels, 6, torch.Generator().manual_seed(s))],
                                  minlength=4).tolist()) for s in range(50)}
    assert all(sorted(m) == [1, 1, 2, 2] for m in mixes) and len(mixes) == 6  # every pair of classes gets the extra


def test_uniform_batch_is_a_subset_without_repeats_or_the_whole_pool():
    pool = torch.arange(10, 30)
    batch = uniform_batch(pool, 7, torch.Generator().manual_seed(0))
    assert batch.unique().numel() == 7 and np.isin(batch.numpy(), pool.numpy()).all()
    assert torch.equal(uniform_batch(pool.flip(0), 25, torch.Generator().manual_seed(0)), pool)


@pytest.mark.parametrize("sampling", ["uniform", "class_balanced"])
@pytest.mark.parametrize("resample", [True, False], ids=["resampled", "fixed"])
def test_the_class_mix_differs_between_steps(cifar_lt_labels, sampling, resample):
    sampler = MetaSetSampler(cifar_lt_labels, RATIO, BATCH, seed=0, resample=resample, sampling=sampling)
    mixes = {tuple(torch.bincount(cifar_lt_labels[sampler.meta_batch(step)], minlength=100).tolist())
             for step in range(10)}
    assert len(mixes) == 10


@pytest.mark.parametrize("sampling", ["uniform", "class_balanced"])
@pytest.mark.parametrize("resample", [True, False], ids=["resampled", "fixed"])
def test_meta_batches_are_a_function_of_seed_and_step(cifar_lt_labels, sampling, resample):
    def sampler(seed):
        return MetaSetSampler(cifar_lt_labels, RATIO, BATCH, seed=seed, resample=resample, sampling=sampling)

    train_batch = torch.arange(0, 1000, 7)
    in_order = [sampler(3).meta_batch(step, train_batch) for step in range(6)]
    resumed = sampler(3)  # a fresh process (another DDP rank, or a resume) asks for the steps in another order
    for step in (4, 1, 5, 0, 3, 2):
        assert torch.equal(resumed.meta_batch(step, train_batch), in_order[step])
    assert not torch.equal(sampler(4).meta_batch(0, train_batch), in_order[0])


def test_resampled_meta_set_excludes_the_train_batch_and_keeps_class_quotas():
    labels = torch.arange(200) % 5
    sampler = MetaSetSampler(labels, 0.2, 200, seed=7, resample=True)
    train_batch = torch.arange(0, 200, 3)
    meta_set = sampler.meta_batch(3, train_batch)  # a batch larger than the meta set is the whole meta set
    assert not np.intersect1d(meta_set.numpy(), train_batch.numpy()).size
    remaining = torch.bincount(labels[np.setdiff1d(np.arange(200), train_batch.numpy())])
    assert torch.bincount(labels[meta_set]).tolist() == (remaining.double() * 0.2).round().long().tolist()
    assert sampler.train_indices().numel() == 200


def test_stratified_subset_keeps_class_proportions():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 5 + [3] * 1)
    subset = stratified_subset(torch.arange(labels.numel()), labels, 0.2, torch.Generator().manual_seed(0))
    assert labels[subset].bincount(minlength=4).tolist() == [10, 4, 1, 0]


def test_fixed_split_is_held_out_of_the_inner_loop():
    labels = torch.arange(100) % 4
    sampler = MetaSetSampler(labels, 0.2, 8, seed=0, resample=False)
    assert sampler.fixed_set.numel() == 20
    assert not np.intersect1d(sampler.fixed_set.numpy(), sampler.train_indices().numpy()).size
    assert sampler.train_indices().numel() == 80
    assert np.isin(sampler.meta_batch(5).numpy(), sampler.fixed_set.numpy()).all()
    separate = MetaSetSampler(labels, 0.2, 8, seed=0, resample=True, separate_source=True)
    assert separate.meta_batch(0).numel() == 8
    with pytest.raises(ValueError, match="separate"):
        separate.train_indices()


def test_unknown_sampling_is_rejected():
    with pytest.raises(ValueError, match="sampling must be one of"):
        MetaSetSampler(torch.arange(10) % 2, 0.2, 4, seed=0, resample=True, sampling="stratified")
