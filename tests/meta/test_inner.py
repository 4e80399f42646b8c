"""``metapeft.meta.inner``: the inner update rule against its formula written out here, bit for bit against
torch's SGD without multipliers, and the one rule shared by the look-ahead and the trainer's optimizer."""

from __future__ import annotations

import pytest
import torch

import metapeft
from metapeft.meta import hypergradient, trainable_phi
from metapeft.meta.inner import SGDRule
from metapeft.meta.optim import ModuleLRSGD
from metapeft.params import module_lr_scales
from tests.helpers.meta import classification_loss, lora_mlp, randomize_lora


def _start():
    return [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.randn(2, 5).double()]


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.01), (0.9, 0.01)],
                         ids=["plain", "momentum", "decay", "momentum_decay"])
def test_sgd_rule_follows_its_formula(momentum, weight_decay):
    params = _start()
    scales = [torch.tensor([[0.5], [2.0], [1.0], [0.1]], dtype=torch.float64), None, torch.tensor(3.0).double()]
    rule = SGDRule(0.2, momentum, weight_decay)
    expected, buffers, rule_buffers = [p.clone() for p in params], [None] * 3, [None] * 3
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        before = [p.clone() for p in params]
        params, rule_buffers = rule.update(params, grads, rule_buffers, scales)
        for p, b in zip(before, params):
            assert p is not b
        for i, g in enumerate(grads):
            u = g + weight_decay * expected[i]
            buffers[i] = u if buffers[i] is None or momentum == 0 else momentum * buffers[i] + u
            expected[i] = expected[i] - 0.2 * (1.0 if scales[i] is None else scales[i]) * buffers[i]
        for p, e, m, b in zip(params, expected, rule_buffers, buffers):
            torch.testing.assert_close(p, e, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(m, b, rtol=1e-14, atol=1e-14)


def test_sgd_rule_adjoint_follows_its_formula():
    rule = SGDRule(0.3, 0.9, 0.01)
    adjoint, c, hessian_c = _start(), _start(), _start()
    scales = [None, torch.full((3,), 0.5, dtype=torch.float64), torch.tensor(2.0).double()]
    carry, seed = rule.adjoint_seed(adjoint, scales)
    assert carry is adjoint
    torch.testing.assert_close(seed, [adjoint[0], 0.5 * adjoint[1], 2.0 * adjoint[2]])
    new_adjoint, new_c = rule.adjoint_step(adjoint, c, hessian_c, scales)
    expected = [a - 0.3 * (h + 0.01 * w) for a, h, w in zip(adjoint, hessian_c, c)]
    torch.testing.assert_close(new_adjoint, expected)
    torch.testing.assert_close(new_c, [expected[0] + 0.9 * c[0], 0.5 * expected[1] + 0.9 * c[1],
                                       2.0 * expected[2] + 0.9 * c[2]])


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 5e-4)], ids=["plain", "momentum_decay"])
def test_sgd_rule_is_torch_sgd_bit_for_bit(momentum, weight_decay):
    start = [torch.randn(7, 5), torch.randn(5), torch.randn(33)]
    torchs = [torch.nn.Parameter(s.clone()) for s in start]
    optimizer = torch.optim.SGD(torchs, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    rule, params, buffers = SGDRule(0.05, momentum, weight_decay), [s.clone() for s in start], [None] * 3
    for _ in range(3):
        grads = [torch.randn_like(s) for s in start]
        for p, g in zip(torchs, grads):
            p.grad = g.clone()
        optimizer.step()
        params, buffers = rule.update(params, grads, buffers)
        for p, q in zip(params, torchs):
            assert torch.equal(p, q.detach()), (p - q).abs().max()


def test_module_lr_sgd_takes_the_rule_and_keeps_torch_state():
    start = _start()
    ours = [torch.nn.Parameter(s.clone()) for s in start]
    optimizer = ModuleLRSGD(ours, lr=0.2, momentum=0.9, weight_decay=0.01)
    scales = [torch.full((4, 1), 0.5, dtype=torch.float64), None, None]
    rule, params, buffers = SGDRule(0.2, 0.9, 0.01), [s.clone() for s in start], [None] * 3
    for _ in range(2):
        grads = [torch.randn_like(s) for s in start]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        optimizer.step(lr_scales=scales)
        params, buffers = rule.update(params, grads, buffers, scales)
    for p, q, m in zip(ours, params, buffers):
        assert torch.equal(p.detach(), q) and torch.equal(optimizer.state[p]["momentum_buffer"], m)
    assert set(optimizer.state_dict()["state"][0]) == {"momentum_buffer"}
    with pytest.raises(ValueError, match="nesterov"):
        ModuleLRSGD(ours, lr=0.1, momentum=0.9, nesterov=True)


@pytest.mark.parametrize("module_lr", [False, True], ids=["plain", "module_lr"])
def test_the_lookahead_is_the_rule(module_lr):
    """K = 1: phi_1 of the hypergradient is the rule's update of phi with phi_grads, bit for bit: the real inner
    step the trainer takes from the same gradient."""
    model = lora_mlp(segments=2).double()
    randomize_lora(model)
    x, y = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 4, (16,))
    phi = trainable_phi(model)
    buffers = [torch.randn_like(p) for p in phi]
    scales = module_lr_scales(model, phi) if module_lr else None
    result = hypergradient(model, classification_loss, (x, y), (x, y), lr=0.1, momentum=0.9, momentum_buffers=buffers,
                           weight_decay=5e-4, mode="first_order", lr_scales=scales)
    expected, _ = SGDRule(0.1, 0.9, 5e-4).update([p.detach() for p in phi], result.phi_grads, buffers, scales)
    for p, e in zip(result.lookahead, expected):
        assert torch.equal(p, e)


def test_sgd_rule_checks_its_hyperparameters():
    for kwargs in ({"lr": -0.1}, {"lr": 0.1, "momentum": True}, {"lr": 0.1, "weight_decay": float("nan")}):
        with pytest.raises(ValueError, match="must be a float >= 0"):
            SGDRule(**kwargs)
    assert metapeft.meta.MODES == ("exact", "finite_difference", "first_order")
