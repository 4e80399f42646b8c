"""The modulator: the raw meta-parameter rho of each PEFT module and its constraint gamma = f(rho).

- ``"softplus"``: gamma = softplus(rho) (the paper); a step of size s in rho moves gamma by about s near gamma = 1,
  by s * gamma near 0 and by s when gamma is large.
- ``"exp"``: gamma = exp(rho) (log-space); a step of size s in rho scales gamma by e^s at every gamma, so a
  meta optimizer moves a scale that is 8x too large as fast as one that is 8x too small (docs/method.md,
  "Why the modulator could not rescue a bad scale").
- ``"none"``: gamma = rho (the authors' code; gamma may turn negative).
"""

from __future__ import annotations

import math

import torch

CONSTRAINTS = ("softplus", "exp", "none")


def check_constraint(constraint: str) -> str:
    """Validate a ``constraint=`` argument."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
    return constraint


def gamma_from_modulator(modulator: torch.Tensor, constraint: str) -> torch.Tensor:
    """gamma = softplus(rho) (>= 0; the paper), exp(rho) (> 0) or rho itself (``"none"``; the authors' code).
    Shape kept."""
    if constraint == "softplus":
        return torch.nn.functional.softplus(modulator)
    return modulator.exp() if constraint == "exp" else modulator


def scale_from_modulator(modulator: torch.Tensor, constraint: str, factor: float) -> torch.Tensor:
    """An op's scale ``factor * gamma(rho)`` (shape kept); a factor of 1 (LoRA with alpha = r, an adapter with
    alpha 1) costs no multiply."""
    gamma = gamma_from_modulator(modulator, constraint)
    return gamma if factor == 1.0 else gamma * factor


def modulator_gradient(grad_scale: torch.Tensor, modulator: torch.Tensor, constraint: str,
                       factor: float = 1.0) -> torch.Tensor:
    """d loss / d rho from d loss / d scale for ``scale = factor * gamma(rho)``: times factor, then times sigmoid(rho)
    (softplus' derivative), exp(rho) (exp's) or unchanged ("none")."""
    grad_gamma = grad_scale if factor == 1.0 else grad_scale * factor
    if constraint == "softplus":
        return grad_gamma * torch.sigmoid(modulator)
    return grad_gamma * modulator.exp() if constraint == "exp" else grad_gamma


def modulator_for_gamma(gamma: float, constraint: str) -> float:
    """The raw value rho with ``gamma_from_modulator(rho) == gamma`` (softplus needs gamma > 0)."""
    check_constraint(constraint)
    if constraint == "none":
        return float(gamma)
    if not gamma > 0 or not math.isfinite(gamma):
        raise ValueError(f"init_gamma must be a finite number > 0 with constraint={constraint!r}, got {gamma}")
    return math.log(gamma) if constraint == "exp" else gamma + math.log(-math.expm1(-gamma))


def modulator_from_gamma(gamma: torch.Tensor, constraint: str) -> torch.Tensor:
    """Tensor inverse of :func:`gamma_from_modulator`: rho with ``gamma_from_modulator(rho) == gamma`` (gamma > 0
    for ``"softplus"`` and ``"exp"``). Shape kept."""
    if constraint == "softplus":
        return gamma + torch.log(-torch.expm1(-gamma))
    return gamma.log() if constraint == "exp" else gamma


def log_gamma_gradient(grad_modulator: torch.Tensor, modulator: torch.Tensor, constraint: str) -> torch.Tensor:
    """d loss / d log(gamma) from d loss / d rho: ``grad * gamma / gamma'(rho)`` (gamma'(rho) = sigmoid(rho) for
    softplus, gamma for exp, 1 for none). Shape kept."""
    gamma = gamma_from_modulator(modulator, constraint)
    if constraint == "softplus":
        return grad_modulator * gamma / torch.sigmoid(modulator)
    return grad_modulator if constraint == "exp" else grad_modulator * gamma
