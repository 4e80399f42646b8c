"""The unfused, HF-PEFT-style computations: the tests' oracle twin and the benchmarks' baseline.

Never a user backend. Each step is a separate op with autograd through all of it, exactly as HF PEFT's
``lora.Linear`` does it, plus a learnable per-segment scale; it keeps every intermediate autograd needs
(several M x N tensors and a dropout mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metapeft.modulator import modulator_for_gamma
from metapeft.ops.dropout import dropout_keep_mask


def reference_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout with the same seeded mask as the ``torch`` backend, applied as a stored mask."""
    if p == 0.0:
        return x
    mask = dropout_keep_mask(tuple(x.shape), p, seed, x.device).to(x.dtype) / (1.0 - p)
    return x * mask


def scaled_lora_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Unfused scaled LoRA: ``base(x) + cat_j(scale_j * B_j(A_j(drop(x))))``; shapes as ``metapeft.ops.scaled_lora``.

    x (..., K), weight (N, K), bias (N,) or None, lora_A (S*r, K), lora_B (N, r), scale (S,).
    """
    segments = scale.shape[0]
    result = F.linear(x, weight, bias)
    dropped = reference_dropout(x, dropout_p, seed)
    a_blocks = lora_A.chunk(segments, dim=0)
    b_blocks = lora_B.chunk(segments, dim=0)
    lora = torch.cat(
        [F.linear(F.linear(dropped, a), b) * scale[j].to(x.dtype) for j, (a, b) in enumerate(zip(a_blocks, b_blocks))],
        dim=-1,
    )
    return result + lora


def adapter_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: torch.Tensor,
    activation: str = "relu",
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Unfused adapter: ``(x if residual is None else residual) + scale * up(act(down(drop(x))))``.

    Shapes as ``metapeft.ops.adapter``: x (..., D), residual (..., D) or None, down_weight (b, D), down_bias (b,)
    or None, up_weight (D, b), up_bias (D,) or None, scale (1,); ``activation`` "relu" or "gelu" (exact).
    """
    hidden = F.linear(reference_dropout(x, dropout_p, seed), down_weight, down_bias)
    hidden = F.relu(hidden) if activation == "relu" else F.gelu(hidden)
    delta = F.linear(hidden, up_weight, up_bias) * scale.to(x.dtype)
    return (x if residual is None else residual) + delta


class ReferenceMetaLoRA(nn.Module):
    """The unfused LoRA with a learnable per-segment modulator: the tests' brute-force twin of ``FusedMetaLoRA``
    and the benchmarks' baseline.

    x (..., K) -> (..., N); parameters ``lora_A`` (S*r, K), ``lora_B`` (N, r) (zeros), ``modulator`` (S,) with
    gamma = softplus(modulator) = 1 at init.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, segments: int = 1) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.lora_A = nn.Parameter(torch.randn(segments * rank, base.in_features) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.modulator = nn.Parameter(torch.full((segments,), modulator_for_gamma(1.0, "softplus")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.nn.functional.softplus(self.modulator) * (self.alpha / self.rank)
        return scaled_lora_reference(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, scale)
