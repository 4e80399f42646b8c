"""``metapeft.modulator``: gamma from rho per constraint, its gradient against autograd, the inverses."""

from __future__ import annotations

import pytest
import torch

import metapeft
from metapeft.modulator import (
    gamma_from_modulator,
    log_gamma_gradient,
    modulator_for_gamma,
    modulator_from_gamma,
    modulator_gradient,
)

CONSTRAINTS = ("softplus", "exp", "none")


@pytest.mark.parametrize("constraint", CONSTRAINTS)
def test_gradient_and_log_gradient_match_autograd(constraint):
    rho = torch.tensor([-3.0, -0.2, 0.5, 2.5], dtype=torch.float64, requires_grad=True)
    grad_scale = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    factor = 1.7
    (autograd,) = torch.autograd.grad((factor * gamma_from_modulator(rho, constraint) * grad_scale).sum(), rho)
    torch.testing.assert_close(modulator_gradient(grad_scale, rho.detach(), constraint, factor), autograd)
    # d/d log(gamma): perturb log(gamma) and map back through the inverse
    log_gamma = gamma_from_modulator(rho.detach(), constraint).abs().log().requires_grad_(True)
    sign = gamma_from_modulator(rho.detach(), constraint).sign()
    loss = (gamma_from_modulator(modulator_from_gamma(sign * log_gamma.exp(), constraint), constraint) * grad_scale)
    (expected,) = torch.autograd.grad(loss.sum(), log_gamma)
    (per_rho,) = torch.autograd.grad((gamma_from_modulator(rho, constraint) * grad_scale).sum(), rho)
    torch.testing.assert_close(log_gamma_gradient(per_rho, rho.detach(), constraint), expected)


@pytest.mark.parametrize("constraint", ("softplus", "exp"))
@pytest.mark.parametrize("gamma", [1e-3, 0.25, 1.0, 8.0])
def test_inverses(constraint, gamma):
    rho = modulator_for_gamma(gamma, constraint)
    assert gamma_from_modulator(torch.tensor(rho, dtype=torch.float64), constraint).item() == pytest.approx(gamma)
    tensor = modulator_from_gamma(torch.tensor([gamma], dtype=torch.float64), constraint)
    assert tensor.item() == pytest.approx(rho)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_exp_and_softplus_refuse_non_positive_init_gamma(bad):
    with pytest.raises(ValueError, match="init_gamma"):
        modulator_for_gamma(bad, "exp")


def test_exp_layer_gradient_through_the_op_equals_autograd_of_the_formula():
    """The op's backward applies exp's derivative: d loss / d rho of a FusedMetaLoRA with constraint="exp" equals
    autograd through y = x W^T + b + exp(rho) * alpha/r * x A^T B^T in float64."""
    torch.manual_seed(0)
    layer = metapeft.FusedMetaLoRA(torch.nn.Linear(6, 9), rank=2, segments=3, constraint="exp").double()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.modulator.copy_(torch.tensor([-0.5, 0.1, 0.9]))
    x = torch.randn(5, 6, dtype=torch.float64)
    (actual,) = torch.autograd.grad(layer(x).square().sum(), layer.modulator)
    rho = layer.modulator.detach().clone().requires_grad_(True)
    scale = (rho.exp() * layer.alpha / layer.rank).repeat_interleave(3)
    delta = (x @ layer.lora_A.T).reshape(5, 3, 2)
    lora = torch.einsum("msr,snr->msn", delta, layer.lora_B.reshape(3, 3, 2)).reshape(5, 9)
    reference = layer.base(x) + scale * lora
    (expected,) = torch.autograd.grad(reference.square().sum(), rho)
    torch.testing.assert_close(actual, expected)
