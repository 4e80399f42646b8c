"""Merge every ``FusedMetaLoRA`` of an injected model into its frozen weight for zero-overhead inference, and undo
it."""

from __future__ import annotations

import torch
from torch import nn

from metapeft.inject import peft_modules
from metapeft.layers import FusedMetaLoRA


def _mergeable(model: nn.Module) -> list[FusedMetaLoRA]:
    modules = peft_modules(model)
    unmergeable = [name for name, m in modules if not isinstance(m, FusedMetaLoRA)]
    if unmergeable:
        raise ValueError(f"adapters have a nonlinearity and cannot be merged into weights: {unmergeable[:3]}")
    if not modules:
        raise ValueError("model holds no metapeft modules to merge")
    return [m for _, m in modules]


def merge(model: nn.Module) -> int:
    """Fold every ``FusedMetaLoRA``'s ``gamma * alpha/r * B A`` into its frozen weight (zero-overhead inference);
    returns the number merged. Adapters cannot be merged, nor modules with a non-finite gamma or LoRA weight
    (clear error naming them, nothing changed)."""
    modules = _mergeable(model)
    merged = [m for m in modules if m.merged]
    if merged:
        raise RuntimeError(f"{len(merged)} of {len(modules)} LoRA modules are already merged")
    names = {id(m): name for name, m in peft_modules(model)}
    finite = torch.stack([torch.isfinite(m.delta_weight()).all() for m in modules]).tolist()
    bad = [names[id(m)] for m, ok in zip(modules, finite) if not ok]
    if bad:
        raise ValueError(f"cannot merge: non-finite gamma or LoRA weights in {len(bad)} module(s) {bad[:3]}; "
                         "merging would write NaN/inf into the frozen base weights")
    for module in modules:
        module.merge()
    return len(modules)


def unmerge(model: nn.Module) -> int:
    """Undo :func:`merge` (exact up to the weight dtype's rounding); returns the number unmerged."""
    modules = _mergeable(model)
    unmerged = [m for m in modules if not m.merged]
    if unmerged:
        raise RuntimeError(f"{len(unmerged)} of {len(modules)} LoRA modules are not merged")
    for module in modules:
        module.unmerge()
    return len(modules)
