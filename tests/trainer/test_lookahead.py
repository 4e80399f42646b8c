"""The trainer's K-step look-ahead: its meta step is ``metapeft.meta.hypergradient`` over the step's batch and the
K - 1 batches ``metapeft.data.sampling.lookahead_batches`` draws, with a meta batch that excludes all of them."""

from __future__ import annotations

import copy

import pytest
import torch

from metapeft.data.sampling import lookahead_batches
from metapeft.losses import LogitAdjustedLoss
from metapeft.meta import hypergradient
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from tests.helpers.meta import relative_error
from tests.helpers.toy import LongTailedBlobs, tiny_net_with_random_lora

COUNTS = [60, 30, 15, 8]  # 113 samples: three batches of 16 leave a meta set


def test_lookahead_batches_are_reproducible_and_leave_out_the_steps_batch():
    indices, batch = torch.arange(3, 40), torch.arange(5, 15)
    drawn = lookahead_batches(indices, batch, 2, 8, seed=0, step=4)
    assert all(torch.equal(a, b) for a, b in zip(drawn, lookahead_batches(indices, batch, 2, 8, seed=0, step=4)))
    assert not torch.equal(drawn[0], lookahead_batches(indices, batch, 1, 8, seed=0, step=5)[0])
    for b in drawn:
        assert b.numel() == 8 and b.unique().numel() == 8
        assert torch.isin(b, indices).all() and not torch.isin(b, batch).any()
    with pytest.raises(ValueError, match="look-ahead"):
        lookahead_batches(indices, indices, 1, 8, seed=0, step=0)


@pytest.mark.parametrize("mode", ["exact", "first_order"])
def test_meta_step_uses_k_lookahead_steps(mode):
    data = LongTailedBlobs(COUNTS)
    model = tiny_net_with_random_lora()
    config = TrainerConfig(batch_size=16, meta_lr=0.05, classifier="linear", meta_mode=mode, meta_lookahead_steps=3,
                           progress=False)
    trainer = MetaPEFTTrainer(model, data, config=config)
    twin = copy.deepcopy(model)
    batch_indices = torch.arange(16)
    labels = torch.tensor(data.labels)
    x, y = data.x[batch_indices].double(), labels[batch_indices]
    extra = lookahead_batches(trainer.train_indices, batch_indices, 2, 16, config.seed, 0)
    meta_indices = trainer.meta_sampler.meta_batch(0, torch.cat([batch_indices, *extra]))
    assert not torch.isin(meta_indices, torch.cat([batch_indices, *extra])).any()
    criterion = LogitAdjustedLoss(COUNTS).double()

    def loss_fn(m, batch):
        return criterion(m(batch[0]), batch[1])

    expected = hypergradient(twin, loss_fn, (x, y), (data.x[meta_indices].double(), labels[meta_indices]), lr=0.01,
                             momentum=0.9, weight_decay=5e-4, mode=mode,
                             lookahead_batches=[(data.x[b].double(), labels[b]) for b in extra])
    one_step = hypergradient(twin, loss_fn, (x, y), (data.x[meta_indices].double(), labels[meta_indices]), lr=0.01,
                             momentum=0.9, weight_decay=5e-4, mode=mode)
    assert relative_error(expected.meta_grads, one_step.meta_grads) > 1e-2, "K must matter in this test"
    result, meta_loss = trainer.step.meta_step(x, y, batch_indices, 0)
    assert relative_error(result.meta_grads, expected.meta_grads) < 1e-12
    assert relative_error(result.lookahead, expected.lookahead) < 1e-12
    assert torch.allclose(meta_loss, expected.val_loss, rtol=1e-12)
