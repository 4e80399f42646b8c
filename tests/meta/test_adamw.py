"""The AdamW inner rule (``metapeft.meta.inner.AdamWRule``) in float64: its step against torch's AdamW (bit for bit)
and TorchOpt's differentiable ``adamw``; the hypergradient through K AdamW look-ahead steps, started from a live
optimizer's state, against autograd through TorchOpt's unrolled steps and against the ``torch.func`` brute force
(``metapeft.reference.brute_force_hypergradient(adamw=...)``), in every mode."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metapeft.meta import hypergradient, trainable_phi
from metapeft.meta.inner import AdamWRule, AdamWState
from metapeft.meta.optim import inner_rule_for
from metapeft.params import meta_parameters, module_lr_scales
from metapeft.reference import brute_force_hypergradient, reference_twin
from tests.helpers.meta import (
    batches,
    classification_loss,
    independent_lr_scales,
    lora_mlp,
    more_train_batches,
    relative_error,
)

LR, BETAS, EPS, WEIGHT_DECAY = 0.02, (0.8, 0.95), 1e-6, 0.1
MODE_TOLERANCE = {"exact": 1e-9, "finite_difference": 1e-3, "first_order": 1e-10}


def _start():
    return [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.randn(9).double()]


@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["plain", "decay"])
def test_adamw_rule_is_torch_adamw_bit_for_bit(weight_decay):
    start = _start()
    torchs = [torch.nn.Parameter(s.clone()) for s in start]
    optimizer = torch.optim.AdamW(torchs, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, foreach=False)
    rule, params, state = AdamWRule(LR, BETAS, EPS, weight_decay), [s.clone() for s in start], [None] * 3
    for _ in range(4):
        grads = [torch.randn_like(s) for s in start]
        grads[1][0] = 0.0  # a zero gradient entry: v = 0 at the first step
        for p, g in zip(torchs, grads):
            p.grad = g.clone()
        optimizer.step()
        params, state = rule.update(params, grads, state)
        for p, q, s in zip(params, torchs, state):
            assert torch.equal(p, q.detach()), (p - q).abs().max()
            assert torch.equal(s.exp_avg, optimizer.state[q]["exp_avg"])
            assert torch.equal(s.exp_avg_sq, optimizer.state[q]["exp_avg_sq"])
            assert s.step == float(optimizer.state[q]["step"])


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_lookahead_from_a_live_adamw_is_its_next_step(implementation):
    """inner_rule_for reads (exp_avg, exp_avg_sq, step) and each group's weight decay; the look-ahead's phi_1 is the
    optimizer's next step from the same gradient (bit for bit for the single-tensor path, to rounding otherwise)."""
    model = lora_mlp(segments=2)
    phi = trainable_phi(model)
    groups = [{"params": phi[:-1]}, {"params": phi[-1:], "weight_decay": 0.0}]  # the head's bias: no decay
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                  **{implementation: True})
    train, val = batches("mlp")
    for _ in range(2):
        for p in phi:
            p.grad = torch.randn_like(p)
        optimizer.step()
    rule, state = inner_rule_for(optimizer, phi)
    assert rule.decays(len(phi)) == [WEIGHT_DECAY] * (len(phi) - 1) + [0.0]
    assert all(s.step == 2.0 for s in state)
    result = hypergradient(model, classification_loss, train, val, mode="first_order", inner_rule=rule,
                           inner_state=state)
    for p, g in zip(phi, result.phi_grads):
        p.grad = g.clone()
    optimizer.step()
    for p, q in zip(result.lookahead, phi):
        torch.testing.assert_close(p, q.detach(), rtol=1e-14, atol=1e-15)


def test_adamw_rule_with_multipliers_follows_its_formula():
    params, scales = _start(), [torch.tensor([[0.5], [2.0], [1.0], [0.1]]).double(), None, torch.tensor(3.0).double()]
    rule, state, expected = AdamWRule(LR, BETAS, EPS, WEIGHT_DECAY), [None] * 3, [p.clone() for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for t in range(1, 4):
        grads = [torch.randn_like(p) for p in params]
        params, state = rule.update(params, grads, state, scales)
        for i, (g, d) in enumerate(zip(grads, scales)):
            m, v = BETAS[0] * moments[i][0] + (1 - BETAS[0]) * g, BETAS[1] * moments[i][1] + (1 - BETAS[1]) * g * g
            moments[i] = (m, v)
            direction = WEIGHT_DECAY * expected[i] + m / (1 - BETAS[0] ** t) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
            expected[i] = expected[i] - LR * (1.0 if d is None else d) * direction
        torch.testing.assert_close(params, expected, rtol=1e-13, atol=1e-14)


def torchopt_oracle(model, warm_grads, train_batches, val_batch, first_order: bool):
    """(d L_val / d rho, phi_K) by autograd through TorchOpt's differentiable ``adamw``: ``warm_grads`` real steps
    (no graph), then K = len(train_batches) steps, each on grad_phi L_train(phi_k, rho) (held fixed when
    ``first_order``), through the reference twin. Run under a float64 default dtype: TorchOpt computes its bias
    corrections ``1 - b ** count`` as tensors of the default dtype (float32 would cost it 1e-8)."""
    torchopt = pytest.importorskip("torchopt")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _torchopt_unrolled(torchopt, model, warm_grads, train_batches, val_batch, first_order)
    finally:
        torch.set_default_dtype(default)


def _torchopt_unrolled(torchopt, model, warm_grads, train_batches, val_batch, first_order: bool):
    twin = reference_twin(model)
    phi_ids, rho_ids = {id(p) for p in trainable_phi(model)}, {id(p) for p in meta_parameters(model)}
    named = dict(model.named_parameters())
    phi = {n: p.detach().clone() for n, p in named.items() if id(p) in phi_ids}
    rho = {n: p.detach().clone().requires_grad_() for n, p in named.items() if id(p) in rho_ids}
    frozen = {n: p.detach() for n, p in named.items() if id(p) not in phi_ids | rho_ids}

    def loss(phi_, batch):
        return classification_loss(lambda x: functional_call(twin, {**frozen, **phi_, **rho}, (x,)), batch)

    optimizer = torchopt.adamw(LR, BETAS, EPS, WEIGHT_DECAY)
    state = optimizer.init(phi)
    for grads in warm_grads:
        updates, state = optimizer.update(dict(zip(phi, grads)), state, params=phi, inplace=False)
        phi = torchopt.apply_updates(phi, updates, inplace=False)
    phi = {n: p.requires_grad_() for n, p in phi.items()}
    for batch in train_batches:
        grads = torch.autograd.grad(loss(phi, batch), list(phi.values()), create_graph=not first_order)
        updates, state = optimizer.update(dict(zip(phi, grads)), state, params=phi, inplace=False)
        phi = torchopt.apply_updates(phi, updates, inplace=False)
    meta_grads = torch.autograd.grad(loss(phi, val_batch), list(rho.values()))
    return list(meta_grads), [p.detach() for p in phi.values()]


def _warm_adamw(model, warm_grads) -> torch.optim.AdamW:
    """A torch AdamW over the model's phi after ``warm_grads`` steps."""
    phi = trainable_phi(model)
    optimizer = torch.optim.AdamW(phi, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False)
    for grads in warm_grads:
        for p, g in zip(phi, grads):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


@pytest.mark.parametrize("steps", [1, 3], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("mode", ["exact", "finite_difference", "first_order"])
def test_hypergradient_through_adamw_matches_torchopt(mode, steps):
    torch.manual_seed(5)
    model = lora_mlp(segments=3)
    train, val = batches("mlp")
    more = more_train_batches(steps)
    warm_grads = [[torch.randn_like(p) for p in trainable_phi(model)] for _ in range(2)]
    expected, lookahead = torchopt_oracle(model, warm_grads, [train, *more], val, first_order=mode == "first_order")
    rule, state = inner_rule_for(_warm_adamw(model, warm_grads), trainable_phi(model))
    result = hypergradient(model, classification_loss, train, val, mode=mode, lookahead_batches=more,
                           inner_rule=rule, inner_state=state)
    assert relative_error(result.lookahead, lookahead) < 1e-12
    assert relative_error(result.meta_grads, expected) < MODE_TOLERANCE[mode], mode


@pytest.mark.parametrize("module_lr", [False, True], ids=["plain", "module_lr"])
def test_hypergradient_through_adamw_matches_brute_force(module_lr):
    """K = 2 from a live state, against torch.func through the AdamW formula written in the oracle; with module-wise
    learning rates gamma is differentiated in the step size too (first_order keeps that term)."""
    torch.manual_seed(6)
    model = lora_mlp(segments=2)
    train, val = batches("mlp")
    more = more_train_batches(2)
    warm_grads = [[torch.randn_like(p) for p in trainable_phi(model)] for _ in range(3)]
    rule, state = inner_rule_for(_warm_adamw(model, warm_grads), trainable_phi(model))
    adamw = {"betas": BETAS, "eps": EPS, "state": [(s.exp_avg, s.exp_avg_sq, s.step) for s in state]}
    kwargs = {"lr": LR, "weight_decay": WEIGHT_DECAY, "lookahead_batches": more, "adamw": adamw,
              "lr_scales": independent_lr_scales(model) if module_lr else None}
    oracle = {order: brute_force_hypergradient(model, classification_loss, train, val, first_order=order, **kwargs)
              for order in (False, True)}
    for mode, expected in (("exact", oracle[False]), ("finite_difference", oracle[False]),
                           ("first_order", oracle[True])):
        scales = module_lr_scales(model, trainable_phi(model)) if module_lr else None
        result = hypergradient(model, classification_loss, train, val, mode=mode, lookahead_batches=more,
                               inner_rule=rule, inner_state=state, lr_scales=scales)
        assert relative_error(result.meta_grads, expected.meta_grads) < MODE_TOLERANCE[mode], mode
        assert relative_error(result.lookahead, expected.lookahead) < 1e-12, mode


def test_unsupported_optimizers_and_arguments_fail_clearly():
    model = lora_mlp(segments=1)
    phi = trainable_phi(model)
    train, val = batches("mlp")
    with pytest.raises(ValueError, match="amsgrad"):
        AdamWRule(LR, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        inner_rule_for(torch.optim.AdamW(phi, amsgrad=True), phi)
    with pytest.raises(ValueError, match="decoupled"):
        inner_rule_for(torch.optim.Adam(phi, weight_decay=0.1), phi)
    with pytest.raises(ValueError, match="nesterov"):
        inner_rule_for(torch.optim.SGD(phi, lr=0.1, momentum=0.9, nesterov=True), phi)
    with pytest.raises(ValueError, match="Adagrad has no inner rule"):
        inner_rule_for(torch.optim.Adagrad(phi), phi)
    with pytest.raises(ValueError, match="does not hold phi"):
        inner_rule_for(torch.optim.AdamW(phi[:1]), phi)
    with pytest.raises(ValueError, match="do not also pass lr"):
        hypergradient(model, classification_loss, train, val, lr=0.1, inner_rule=AdamWRule(LR))
    with pytest.raises(ValueError, match=r"AdamW state \[0\]"):
        hypergradient(model, classification_loss, train, val, inner_rule=AdamWRule(LR),
                      inner_state=[AdamWState(torch.zeros(1), torch.zeros(1), 1.0)] + [None] * (len(phi) - 1))
