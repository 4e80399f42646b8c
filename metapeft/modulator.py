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


def scale_from_modulator(modulator: torch.Tensor, constraint: str, factor: float) -> torch.Tensor:
    """An op's scale ``factor * gamma(rho)`` (shape kept); a factor of 1 (LoRA with alpha = r, an adapter with
    alpha 1) costs no multiply."""
    gamma = gamma_from_modulator(modulator, constraint)
    return gamma if factor == 1.0 else gamma * factor


def modulator_gradient(grad_scale: torch.Tensor, modulator: torch.Tensor, constraint: str,
                       factor: float = 1.0) -> torch.Tensor:
    """d loss / d rho from d loss / d scale for ``scale = factor * gamma(rho)``: times factor, then times sigmoid(rho)
    (softplus' derivative) or unchanged ("none")."""
    grad_gamma = grad_scale if factor == 1.0 else grad_scale * factor
    return grad_gamma * torch.sigmoid(modulator) if constraint == "softplus" else grad_gamma


def modulator_for_gamma(gamma: float, constraint: str) -> float:
    """The raw value rho with ``gamma_from_modulator(rho) == gamma`` (softplus needs gamma > 0)."""
    check_constraint(constraint)
    if constraint == "none":
        return float(gamma)
    if gamma <= 0:
        raise ValueError(f"init_gamma must be > 0 with constraint='softplus', got {gamma}")
    return gamma + math.log(-math.expm1(-gamma))
