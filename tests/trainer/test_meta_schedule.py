"""The meta schedule's options in the trainer: dense early meta steps, the modulator as a module-wise learning
rate (the inner step equals the hypergradient's look-ahead), the common-scale warm-up, the outer optimizer."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import metapeft
from metapeft.meta import hypergradient, trainable_phi
from metapeft.params import meta_parameters, module_lr_scales
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from tests.helpers.toy import LongTailedBlobs, TinyNet, first_meta_step_inputs, tiny_net_with_random_lora

COUNTS = [20, 12, 6, 4]


def config(**kwargs) -> TrainerConfig:
    """No progress bar, a linear head, and no warm-up unless asked (these tests take the first meta step apart)."""
    return TrainerConfig(**{"progress": False, "classifier": "linear", "meta_warmup_steps": 0, **kwargs})


def test_dense_steps_then_the_interval():
    data = LongTailedBlobs(COUNTS)
    trainer = MetaPEFTTrainer(TinyNet(), data, config=config(epochs=3, batch_size=8, meta_interval=3,
                                                            meta_dense_steps=4, meta_mode="first_order"))
    steps = []
    trainer.step.meta_step = lambda *args, run=trainer.step.meta_step: steps.append(trainer.global_step) or run(*args)
    trainer.fit()
    total = 3 * -(-len(data) // 8)
    assert steps == [t for t in range(total) if t < 4 or t % 3 == 0]


@pytest.mark.parametrize("mode", ["exact", "first_order"])
def test_module_learning_rates_make_the_inner_step_the_lookahead(mode):
    """With meta_module_lr every PEFT weight steps by lr * gamma of its module: after one trainer step phi equals
    the hypergradient's look-ahead with module_lr_scales, and rho moved by Adam's first step along its sign."""
    data = LongTailedBlobs(COUNTS)
    model = tiny_net_with_random_lora()
    with torch.no_grad():
        model.l1.modulator.fill_(-1.0)
        model.l2.modulator.fill_(1.5)
    trainer = MetaPEFTTrainer(model, data, config=config(batch_size=16, meta_lr=0.05, meta_interval=1,
                                                        meta_mode=mode, meta_module_lr=True))
    twin = copy.deepcopy(model)
    batch_indices, (x, y), val, loss_fn = first_meta_step_inputs(trainer, data, COUNTS)

    expected = hypergradient(twin, loss_fn, (x, y), val, lr=0.01, weight_decay=5e-4, mode=mode,
                             lr_scales=module_lr_scales(twin, trainable_phi(twin)))
    plain = hypergradient(twin, loss_fn, (x, y), val, lr=0.01, weight_decay=5e-4, mode=mode)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(expected.lookahead, plain.lookahead))
    trainer.train_step(x, y, batch_indices)
    for p, q in zip(trainable_phi(model), expected.lookahead):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-12)
    for rho, rho0, g in zip(meta_parameters(model), meta_parameters(twin), expected.meta_grads):
        torch.testing.assert_close(rho.detach(), rho0.detach() - 0.05 * g.sign(), rtol=0, atol=1e-7)


class LinearLoRA(nn.Module):
    """A frozen Linear with a rank-2 FusedMetaLoRA at ``alpha``, then a Linear head: no saturating activation, so
    a too-large scale overshoots the one-step look-ahead instead of flattening it."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.l1 = metapeft.FusedMetaLoRA(nn.Linear(12, 16), 2, alpha=alpha)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.l1(x))


def warm_up(alpha: float, seed: int, run_dir) -> tuple[float, torch.Tensor]:
    """One trainer step of :class:`LinearLoRA` at ``alpha`` (init and data ``seed``) with a 4-round warm-up: (the
    logged common factor, gamma right after the warm-up)."""
    torch.manual_seed(seed)
    model = LinearLoRA(alpha)
    trainer = MetaPEFTTrainer(model, LongTailedBlobs(COUNTS, seed=seed),
                              config=config(batch_size=8, lr=0.1, meta_warmup_steps=4, log_every=1,
                                            output_dir=str(run_dir)))
    seen = []
    original = trainer.step.warm_up_modulators
    trainer.step.warm_up_modulators = lambda *a: original(*a) or seen.append(model.l1.gamma.detach().clone())
    trainer.fit(max_steps=1)
    factor = math.exp(trainer.step.warmup_history[-1]["log_scale"])
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["warmup_gamma_factor"] == pytest.approx(factor)
    return factor, seen[0]


def test_warm_up_shrinks_every_gamma_by_one_factor_only_when_the_scale_overshoots(tmp_path):
    """alpha = 1000 r overshoots the one-step look-ahead on every batch: every gamma is halved per round, before the
    first inner step, and once more after the last overshooting round; alpha = r (here undershooting: lr 0.1 is small
    for this task) and alpha = 10 r (inconclusive) leave gamma alone."""
    large, gamma = warm_up(2000.0, 1, tmp_path / "large")
    assert large <= 0.125
    torch.testing.assert_close(gamma, torch.full_like(gamma, large))
    assert warm_up(2.0, 1, tmp_path / "small")[0] == 1.0
    assert warm_up(20.0, 2, tmp_path / "inconclusive")[0] == 1.0


def test_meta_optimizer_and_warm_up_options_are_checked():
    for bad, match in (({"meta_optimizer": "lion"}, "meta_optimizer"), ({"meta_warmup_steps": -1}, "meta_warmup"),
                       ({"meta_warmup_lr": 0.0}, "meta_warmup_lr"), ({"meta_dense_steps": -2}, "meta_dense")):
        with pytest.raises(ValueError, match=match):
            TrainerConfig(**bad)
    trainer = MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS), config=config(meta_optimizer="shared_adam"))
    assert type(trainer.meta_optimizer).__name__ == "SharedAdam"


def test_a_warm_up_that_does_not_move_leaves_the_run_exactly_as_without_one(tmp_path):
    """At a scale the test finds no overshoot in, the warm-up's own draws must not shift the meta batches of the
    training that follows: the trained weights and gammas equal a run without the warm-up bit for bit."""
    runs = []
    for rounds in (0, 4):
        torch.manual_seed(2)
        model = LinearLoRA(20.0)
        trainer = MetaPEFTTrainer(model, LongTailedBlobs(COUNTS, seed=2),
                                  config=config(batch_size=8, lr=0.1, epochs=2, meta_interval=2,
                                                meta_warmup_steps=rounds))
        trainer.fit()
        runs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert trainer.step.warmup_history and not any(h["overshoots"] for h in trainer.step.warmup_history)
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
