"""The brute-force hypergradient oracle against central differences of the look-ahead loss, in float64.

The finite differences use the fused layers and ``torch.autograd.grad`` (first order only), so they share no code
path with the oracle's ``torch.func`` double differentiation through the unfused twin.
"""

from __future__ import annotations

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


def lookahead(model, train, buffers) -> list[torch.Tensor]:
    phi = trainable_phi(model)
    grads = torch.autograd.grad(classification_loss(model, train), phi)
    return [p - LR * (g + WEIGHT_DECAY * p + MOMENTUM * m) for p, g, m in zip(phi, grads, buffers)]


def val_loss_at(model, phi_values, val) -> float:
    phi = trainable_phi(model)
    saved = [p.detach().clone() for p in phi]
    with torch.no_grad():
        for p, value in zip(phi, phi_values):
            p.copy_(value)
        loss = classification_loss(model, val).item()
        for p, value in zip(phi, saved):
            p.copy_(value)
    return loss


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


def test_exact_matches_central_differences_of_the_lookahead_loss(case):
    model, train, val, buffers = case
    result = brute_force_hypergradient(model, classification_loss, train, val, lr=LR, momentum=MOMENTUM,
                                       momentum_buffers=buffers, weight_decay=WEIGHT_DECAY)
    expected = central_differences(model, lambda: val_loss_at(model, lookahead(model, train, buffers), val))
    assert_close_lists(result.meta_grads, expected, rtol=1e-6)
    assert_close_lists(result.lookahead, [t.detach() for t in lookahead(model, train, buffers)], rtol=1e-12)


def test_first_order_holds_the_lookahead_fixed(case):
    model, train, val, buffers = case
    kwargs = {"lr": LR, "momentum": MOMENTUM, "momentum_buffers": buffers, "weight_decay": WEIGHT_DECAY}
    direct = brute_force_hypergradient(model, classification_loss, train, val, first_order=True, **kwargs)
    fixed = [t.detach() for t in lookahead(model, train, buffers)]
    expected = central_differences(model, lambda: val_loss_at(model, fixed, val))
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
