"""The brute-force hypergradient oracle against central differences of the look-ahead loss, in float64.

The finite differences step a copy of the model with ``torch.optim.SGD`` (first-order autograd through the fused
layers), so they share no code path with the oracle's ``torch.func`` double differentiation through the unfused
twin.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metapeft
from metapeft.meta import trainable_phi
from metapeft.reference import brute_force_hypergradient, reference_twin

LR, MOMENTUM, WEIGHT_DECAY, STEP = 0.3, 0.9, 0.05, 1e-5


def classification_loss(model, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


class Net(nn.Module):
    """LoRA with S = 1 and S = 3, a parallel adapter and a head: four modulators (six scalars)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = metapeft.FusedMetaLoRA(nn.Linear(6, 9), rank=2)
        self.qkv = metapeft.FusedMetaLoRA(nn.Linear(9, 12), rank=2, segments=3, alpha=4.0)
        self.adapter = metapeft.FusedMetaAdapter(12, 3, activation="gelu")
        self.mlp = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.qkv(torch.tanh(self.first(x))))
        return self.head(self.adapter(h, residual=self.mlp(h)))


@pytest.fixture()
def case():
    torch.manual_seed(0)
    model = Net().double()
    with torch.no_grad():
        for layer in (model.first, model.qkv):
            layer.lora_B.normal_(std=0.3)
        model.adapter.up_weight.normal_(std=0.3)
        for rho in metapeft.meta_parameters(model):
            rho.uniform_(-0.5, 1.0)
    metapeft.mark_only_peft_trainable(model, extra=(model.head,))
    train = (torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,)))
    val = (torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,)))
    buffers = [torch.randn_like(p) for p in trainable_phi(model)]
    return model, train, val, buffers


def sgd_lookahead(model, batches, buffers) -> nn.Module:
    """A copy of ``model`` after ``torch.optim.SGD`` steps on ``batches`` from momentum ``buffers``."""
    stepped = copy.deepcopy(model)
    phi = trainable_phi(stepped)
    optimizer = torch.optim.SGD(phi, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for p, m in zip(phi, buffers):
        optimizer.state[p]["momentum_buffer"] = m.clone()
    for batch in batches:
        optimizer.zero_grad()
        classification_loss(stepped, batch).backward()
        optimizer.step()
    return stepped


def central_differences(model, objective) -> list[torch.Tensor]:
    """d objective / d rho for every modulator entry, by central differences of step ``STEP``."""
    grads = []
    for rho in metapeft.meta_parameters(model):
        grad = torch.zeros_like(rho)
        for i in range(rho.numel()):
            values = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    rho.view(-1)[i] += sign * STEP
                values.append(objective())
                with torch.no_grad():
                    rho.view(-1)[i] -= sign * STEP
            grad.view(-1)[i] = (values[0] - values[1]) / (2 * STEP)
        grads.append(grad)
    return grads


def assert_close_lists(actual, expected, rtol):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item())


@pytest.mark.parametrize("steps", [1, 3], ids=lambda k: f"K{k}")
def test_exact_matches_central_differences_through_torch_sgd(case, steps):
    model, train, val, buffers = case
    more = [(torch.randn(4 + k, 6, dtype=torch.float64), torch.randint(0, 3, (4 + k,))) for k in range(steps - 1)]
    result = brute_force_hypergradient(model, classification_loss, train, val, lr=LR, momentum=MOMENTUM,
                                       momentum_buffers=buffers, weight_decay=WEIGHT_DECAY, lookahead_batches=more)
    expected = central_differences(
        model, lambda: classification_loss(sgd_lookahead(model, [train, *more], buffers), val).item())
    assert_close_lists(result.meta_grads, expected, rtol=1e-6)
    stepped = sgd_lookahead(model, [train, *more], buffers)
    assert_close_lists(result.lookahead, [p.detach() for p in trainable_phi(stepped)], rtol=1e-12)
    first_grads = torch.autograd.grad(classification_loss(model, train), trainable_phi(model))
    assert_close_lists(result.phi_grads, list(first_grads), rtol=1e-12)


def test_first_order_holds_the_lookahead_fixed(case):
    model, train, val, buffers = case
    kwargs = {"lr": LR, "momentum": MOMENTUM, "momentum_buffers": buffers, "weight_decay": WEIGHT_DECAY}
    direct = brute_force_hypergradient(model, classification_loss, train, val, first_order=True, **kwargs)
    held = sgd_lookahead(model, [train], buffers)  # phi_1 fixed; its modulators are model's
    expected = central_differences(held, lambda: classification_loss(held, val).item())
    assert_close_lists(direct.meta_grads, expected, rtol=1e-6)
    exact = brute_force_hypergradient(model, classification_loss, train, val, **kwargs)
    difference = torch.cat([(a - b).flatten() for a, b in zip(exact.meta_grads, direct.meta_grads)]).norm()
    assert difference > 1e-3 * torch.cat([g.flatten() for g in exact.meta_grads]).norm()


def test_twin_refuses_what_the_reference_cannot_express():
    with pytest.raises(ValueError, match="constraint"):
        reference_twin(nn.Sequential(metapeft.FusedMetaLoRA(nn.Linear(4, 4), rank=1, constraint="none")))
    with pytest.raises(ValueError, match="inactive segments"):
        reference_twin(nn.Sequential(metapeft.FusedMetaLoRA(nn.Linear(4, 6), rank=1, segments=3,
                                                            active_segments=(0, 2))))
    with pytest.raises(ValueError, match="dropout"):
        reference_twin(nn.Sequential(metapeft.FusedMetaLoRA(nn.Linear(4, 4), rank=1, dropout=0.1)).train())
