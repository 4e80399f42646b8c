"""Gradient clipping in the look-ahead (``ClippedRule``): its step is torch's ``clip_grad_norm_`` followed by the
inner rule's, and its hypergradient through K = 1 and 3 clipped SGD / AdamW steps equals ``torch.func`` unrolling the
clipped steps (``metapeft.reference.brute_force_hypergradient(max_grad_norm=...)``), in every mode, float64."""

from __future__ import annotations

import pytest
import torch

from metapeft.meta import hypergradient, trainable_phi
from metapeft.meta.inner import AdamWRule, AdamWState, ClippedRule, SGDRule
from metapeft.meta.optim import inner_rule_for
from metapeft.reference import brute_force_hypergradient
from tests.helpers.meta import batches, classification_loss, lora_mlp, more_train_batches, relative_error

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 0.01
MODE_TOLERANCE = {"exact": 1e-9, "finite_difference": 1e-3, "first_order": 1e-10}


def test_the_clipped_step_is_clip_grad_norm_then_the_rule():
    torch.manual_seed(0)
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    grads = [torch.randn_like(p) * 3 for p in params]
    for max_norm in (0.5, 1e3):  # clipping, and a bound the gradient stays under
        rule = ClippedRule(SGDRule(LR, MOMENTUM, WEIGHT_DECAY), max_norm)
        leaves = [p.clone().requires_grad_() for p in params]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(leaves, max_norm)
        optimizer = torch.optim.SGD(leaves, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        optimizer.step()
        stepped, _ = rule.update(params, grads, [None, None])
        assert all(torch.equal(a, b.detach()) for a, b in zip(stepped, leaves)), max_norm
    zeros = [torch.zeros_like(p) for p in params]  # a zero gradient: nothing to clip, no 0/0 in the adjoint
    assert all(torch.equal(a, b) for a, b in zip(ClippedRule(SGDRule(LR), 0.5)._transpose(zeros, grads), grads))
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        ClippedRule(SGDRule(LR), 0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(p) for p in params], lr=LR)
    clipped, _ = inner_rule_for(optimizer, optimizer.param_groups[0]["params"], max_grad_norm=0.5)
    assert isinstance(clipped, ClippedRule) and isinstance(clipped.inner, SGDRule) and clipped.max_norm == 0.5
    for off in (None, 0.0):  # the trainer's and the HF Trainer's "no clipping"
        assert isinstance(inner_rule_for(optimizer, optimizer.param_groups[0]["params"], off)[0], SGDRule)


def _warm_state(model) -> list[AdamWState]:
    torch.manual_seed(3)
    return [AdamWState(0.1 * torch.randn_like(p), 0.01 * torch.rand_like(p), 3.0) for p in trainable_phi(model)]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_the_hypergradient_through_clipped_steps_matches_brute_force(inner, steps):
    torch.manual_seed(6)
    model = lora_mlp(segments=2)
    train, val = batches("mlp")
    more = more_train_batches(steps)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in torch.autograd.grad(
        classification_loss(model, train), trainable_phi(model))]))
    max_norm = 0.3 * float(norm)  # every step clips
    if inner == "sgd":
        rule, state = SGDRule(LR, MOMENTUM, WEIGHT_DECAY), None
        oracle_kwargs = {"momentum": MOMENTUM}
    else:
        warm = _warm_state(model)
        rule, state = AdamWRule(LR, (0.8, 0.95), 1e-6, WEIGHT_DECAY), warm
        oracle_kwargs = {"adamw": {"betas": (0.8, 0.95), "eps": 1e-6,
                                   "state": [(s.exp_avg, s.exp_avg_sq, s.step) for s in warm]}}
    oracle = {order: brute_force_hypergradient(model, classification_loss, train, val, lr=LR,
                                               weight_decay=WEIGHT_DECAY, lookahead_batches=more, first_order=order,
                                               max_grad_norm=max_norm, **oracle_kwargs)
              for order in (False, True)}
    unclipped = brute_force_hypergradient(model, classification_loss, train, val, lr=LR, weight_decay=WEIGHT_DECAY,
                                          lookahead_batches=more, **oracle_kwargs)
    assert relative_error(unclipped.meta_grads, oracle[False].meta_grads) > 1e-2, "the clip must matter"
    for mode, expected in (("exact", oracle[False]), ("finite_difference", oracle[False]),
                           ("first_order", oracle[True])):
        result = hypergradient(model, classification_loss, train, val, mode=mode, lookahead_batches=more,
                               inner_rule=ClippedRule(rule, max_norm), inner_state=state)
        assert relative_error(result.meta_grads, expected.meta_grads) < MODE_TOLERANCE[mode], mode
        assert relative_error(result.lookahead, expected.lookahead) < 1e-12, mode
        assert relative_error(result.phi_grads, expected.phi_grads) < 1e-12, mode
