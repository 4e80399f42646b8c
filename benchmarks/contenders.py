"""Contenders shared by the benchmarks beside ``metapeft.reference``: HF PEFT's LoRA."""

from __future__ import annotations

import torch
from torch import nn


def hf_peft_lora_linear(base: nn.Linear, rank: int, alpha: float | None = None) -> nn.Module:
    """HF PEFT's ``lora.Linear`` around ``base`` (fixed scale alpha / r, what PEFT users run today)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    alpha = rank if alpha is None else alpha
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0)
    layer = Linear(base.requires_grad_(False), adapter_name="default", config=config, r=rank, lora_alpha=alpha,
                   lora_dropout=0.0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer
