"""Parameter groups of a model with metapeft modules: PEFT weights (phi) and modulators (rho)."""

from __future__ import annotations

from torch import nn

from metapeft.layers.base import MetaPEFTModule


def _peft_modules(model: nn.Module) -> list[MetaPEFTModule]:
    return [m for m in model.modules() if isinstance(m, MetaPEFTModule)]


def peft_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every PEFT weight (LoRA A/B, adapter down/up) in ``model``, in module order; no modulators."""
    return [p for m in _peft_modules(model) for p in m.peft_parameters()]


def meta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every learnable modulator (rho) in ``model``, in module order."""
    return [p for m in _peft_modules(model) for p in m.meta_parameters()]


def mark_only_peft_trainable(model: nn.Module, extra: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Freeze everything in ``model`` except PEFT weights, modulators and the parameters of ``extra``
    modules (e.g. the classifier head). Returns ``model``."""
    model.requires_grad_(False)
    for p in peft_parameters(model) + meta_parameters(model):
        p.requires_grad_(True)
    for module in extra:
        module.requires_grad_(True)
    return model
