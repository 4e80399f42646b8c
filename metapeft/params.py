"""Parameter groups of a model with metapeft modules, the one place that says which is which:

- :func:`peft_parameters`: the PEFT weights only (LoRA A/B, adapter down/up): what an adapter file holds;
- :func:`trainable_phi`: phi, the inner (SGD) loop's parameters: every trainable parameter that is not a
  modulator, so the PEFT weights AND whatever else trains (the classifier head); what the trainer's inner step,
  the hypergradient's look-ahead and :func:`module_lr_scales` index;
- :func:`meta_parameters`: rho, the learnable modulators, the outer loop's parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from metapeft.layers import FusedMetaLoRA
from metapeft.layers.base import MetaPEFTModule


def _peft_modules(model: nn.Module) -> list[MetaPEFTModule]:
    return [m for m in model.modules() if isinstance(m, MetaPEFTModule)]


def peft_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The PEFT weights only: every LoRA A/B and adapter down/up in ``model``, in module order, trainable or not; no
    modulators and no head. Not phi: the inner loop's parameters are :func:`trainable_phi`."""
    return [p for m in _peft_modules(model) for p in m.peft_parameters()]


def trainable_phi(model: nn.Module) -> list[nn.Parameter]:
    """phi, the inner loop's parameters: every parameter of ``model`` with ``requires_grad`` that is not a learnable
    modulator, in ``model.parameters()`` order (the PEFT weights and the head after ``mark_only_peft_trainable``).
    Not :func:`peft_parameters` (PEFT weights only). Also exported as ``metapeft.meta.trainable_phi``."""
    modulators = {id(p) for p in meta_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in modulators]


def meta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every learnable modulator (rho) in ``model``, in module order."""
    return [p for m in _peft_modules(model) for p in m.meta_parameters()]


def modulators_with_constraints(model: nn.Module) -> list[tuple[nn.Parameter, str]]:
    """``(rho, constraint)`` of every learnable modulator in ``model``, in :func:`meta_parameters` order."""
    return [(p, m.constraint) for m in _peft_modules(model) for p in m.meta_parameters()]


def mark_only_peft_trainable(model: nn.Module, extra: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Freeze everything in ``model`` except PEFT weights, modulators and the parameters of ``extra``
    modules (e.g. the classifier head). Returns ``model``."""
    model.requires_grad_(False)
    for p in peft_parameters(model) + meta_parameters(model):
        p.requires_grad_(True)
    for module in extra:
        module.requires_grad_(True)
    return model


def _segment_rows(gamma: torch.Tensor, rows: int) -> torch.Tensor:
    """gamma (S_a,) repeated over ``rows`` (a multiple of S_a) rows as a (rows, 1) column."""
    return gamma.repeat_interleave(rows // gamma.numel()).unsqueeze(1)


def module_lr_scales(model: nn.Module, phi: list[nn.Parameter]) -> list[torch.Tensor | None]:
    """The modulator as a module-wise learning rate: per parameter of ``phi`` (e.g.
    :func:`trainable_phi`), the gamma of the PEFT module it belongs to, shaped to broadcast over it
    and differentiable in the modulators, or None for a parameter outside every PEFT module (the head).

    LoRA with S_a active segments: ``lora_A`` (S_a*r, K) and ``lora_B`` (S_a*N/S, r) get gamma_j on the rows of
    segment j, as (rows, 1) columns; an adapter's weights and biases get its gamma (1,). A module with a fixed
    modulator gives its fixed gamma. Per-channel gammas (``gamma="channel"``) multiply the rows they scale
    (``lora_B``'s rows; an adapter's ``up_weight`` rows and ``up_bias``); a factor whose rows feed every channel of
    its segment (``lora_A``'s rank block, the adapter's ``down_weight`` and ``down_bias``) gets their mean."""
    scales: dict[int, torch.Tensor] = {}
    for module in _peft_modules(model):
        gamma = module.gamma
        for name, p in zip(module.peft_parameter_names, module.peft_parameters()):
            per_channel = module.granularity == "channel"
            if isinstance(module, FusedMetaLoRA) and per_channel and name == "lora_A":
                scales[id(p)] = _segment_rows(gamma.view(len(module.active_segments), -1).mean(1), p.shape[0])
            elif isinstance(module, FusedMetaLoRA):
                scales[id(p)] = _segment_rows(gamma, p.shape[0])
            elif per_channel and name.startswith("up_"):
                scales[id(p)] = gamma.unsqueeze(1) if p.dim() == 2 else gamma
            else:
                scales[id(p)] = gamma.mean().reshape(1) if per_channel else gamma
    return [scales.get(id(p)) for p in phi]
