"""The modulator: the raw meta-parameter rho of each PEFT module and its constraint gamma = f(rho)."""

from __future__ import annotations

import math

import torch

CONSTRAINTS = ("softplus", "none")


def check_constraint(constraint: str) -> str:
    """Validate a ``constraint=`` argument."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
    return constraint


def gamma_from_modulator(modulator: torch.Tensor, constraint: str) -> torch.Tensor:
    """gamma = softplus(rho) (>= 0; the paper) or rho itself (``"none"``; the authors' code). Shape kept."""
    return torch.nn.functional.softplus(modulator) if constraint == "softplus" else modulator


def modulator_gradient(grad_gamma: torch.Tensor, modulator: torch.Tensor, constraint: str) -> torch.Tensor:
    """d loss / d rho from d loss / d gamma: times sigmoid(rho) (softplus' derivative) or unchanged ("none")."""
    return grad_gamma * torch.sigmoid(modulator) if constraint == "softplus" else grad_gamma


def modulator_for_gamma(gamma: float, constraint: str) -> float:
    """The raw value rho with ``gamma_from_modulator(rho) == gamma`` (softplus needs gamma > 0)."""
    check_constraint(constraint)
    if constraint == "none":
        return float(gamma)
    if gamma <= 0:
        raise ValueError(f"init_gamma must be > 0 with constraint='softplus', got {gamma}")
    return gamma + math.log(-math.expm1(-gamma))
