"""Contenders shared by the benchmarks: the unfused reference with a learnable modulator and HF PEFT's LoRA."""

from __future__ import annotations

import torch
from torch import nn

from metapeft.reference import scaled_lora_reference


class ReferenceMetaLoRA(nn.Module):
    """Unfused LoRA with a learnable per-segment modulator (``metapeft.reference``): the baseline we beat.

    x (..., K) -> (..., N); parameters ``lora_A`` (S*r, K), ``lora_B`` (N, r), ``modulator`` (S,).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, segments: int = 1) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.lora_A = nn.Parameter(torch.randn(segments * rank, base.in_features) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.modulator = nn.Parameter(torch.full((segments,), 0.5413))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.nn.functional.softplus(self.modulator) * (self.alpha / self.rank)
        return scaled_lora_reference(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, scale)


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
