"""The benchmarks' contenders besides metapeft: the strongest plain-PyTorch formulations and HF PEFT's LoRA.

The plain-PyTorch modules are what a careful user would write by hand, autograd doing the backward: the learnable
scale multiplies a rank-r factor (LoRA's B, the adapter's bottleneck activations), never an M x N output, and
nothing is concatenated. They are
not test oracles (``metapeft.reference`` is, in float64) and are never a user backend.

Formulation choices, measured fwd+bwd on CPU, fp32, 1 thread (the machine shared with other jobs):
- LoRA, S = 1: ``base(x) + (x A^T) (s B)^T`` as two ``F.linear`` calls and one add. Scaling B (N, r) rather than
  x A^T (M, r) was equal within noise fwd+bwd at x (16, 16), r = 4 and at ViT-B shapes (M = 1576, K = N = 768,
  r = 8) (``0.99x`` / ``1.00x``); ``torch.addmm`` into the base output, a ``bmm`` or in-place ``addmm_`` into
  slices of it were equal within noise at ViT-B shapes and 10-85% slower per call at tiny shapes.
- LoRA, S = 3: one GEMM of x A^T against the block-diagonal ``diag(s_1 B_1, s_2 B_2, s_3 B_3)`` (N x 3r: 3x the
  up-projection FLOPs, about 2% of the base GEMM at r = 8), built by one broadcast multiply of B with
  ``diag(s)``, adds every segment in place of a concatenation: 18% faster fwd+bwd per call than scaling the rank
  blocks of x A^T and ``torch.block_diag`` of B's chunks at x (16, 16), r = 4, equal at ViT-B qkv shapes;
  ``bmm`` plus a transpose copy and per-slice ``addmm_`` were equal within noise at ViT-B qkv shapes and up to
  2x slower per call at tiny shapes.
- Adapter: ``residual + up(act(down(x)) * s)`` with the up bias scaled (``bu * s``): 19% faster fwd+bwd than
  scaling the M x D output at M = 1576, D = 768, bottleneck 64 (and it saves no M x D tensor for d s); 8% slower
  per call at tiny shapes (one more small op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metapeft.modulator import modulator_for_gamma


class PlainMetaLoRA(nn.Module):
    """LoRA with a learnable per-segment modulator in plain PyTorch (autograd backward).

    ``y[..., seg j] = base(x)[..., seg j] + softplus(modulator_j) * alpha / r * (x A_j^T) B_j^T``. Parameter names
    and shapes match ``metapeft.FusedMetaLoRA`` (``load_state_dict`` and ``functional_call`` move between them):
    ``lora_A`` (S*r, K), ``lora_B`` (N, r) (zeros), ``modulator`` (S,) with gamma = 1 at init. x (..., K) -> (..., N).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, segments: int = 1) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.segments = rank, segments
        self.alpha = float(rank if alpha is None else alpha)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.randn(segments * rank, base.in_features, **factory) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self.modulator = nn.Parameter(torch.full((segments,), modulator_for_gamma(1.0, "softplus"), **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.softplus(self.modulator) * (self.alpha / self.rank)
        h = F.linear(x, self.lora_A)
        if self.segments == 1:
            return self.base(x) + F.linear(h, self.lora_B * scale)
        blocks = torch.diag_embed(scale).view(self.segments, 1, self.segments, 1)
        lora_B = (self.lora_B.view(self.segments, -1, 1, self.rank) * blocks).view(-1, self.segments * self.rank)
        return self.base(x) + F.linear(h, lora_B)


class PlainMetaAdapter(nn.Module):
    """A bottleneck adapter with a learnable modulator in plain PyTorch (autograd backward).

    ``out = residual + softplus(modulator) * alpha * up(act(down(x)))``, residual = x for ``kind="sequential"``.
    Parameter names and shapes match ``metapeft.FusedMetaAdapter``: ``down_weight`` (b, D), ``down_bias`` (b,),
    ``up_weight`` (D, b), ``up_bias`` (D,), ``modulator`` (1,). x and residual (..., D) -> (..., D).
    """

    def __init__(self, dim: int, bottleneck: int, alpha: float = 1.0, kind: str = "parallel",
                 activation: str = "relu") -> None:
        super().__init__()
        self.alpha, self.kind = float(alpha), kind
        self.activation = F.relu if activation == "relu" else F.gelu
        self.down_weight = nn.Parameter(torch.randn(bottleneck, dim) / dim**0.5)
        self.down_bias = nn.Parameter(torch.zeros(bottleneck))
        self.up_weight = nn.Parameter(torch.zeros(dim, bottleneck))
        self.up_bias = nn.Parameter(torch.zeros(dim))
        self.modulator = nn.Parameter(torch.full((1,), modulator_for_gamma(1.0, "softplus")))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        scale = F.softplus(self.modulator) * self.alpha
        hidden = self.activation(F.linear(x, self.down_weight, self.down_bias)) * scale
        return (x if residual is None else residual) + F.linear(hidden, self.up_weight, self.up_bias * scale)


def hf_peft_lora_linear(base: nn.Linear, rank: int, alpha: float | None = None) -> nn.Module:
    """HF PEFT's ``lora.Linear`` around ``base`` (fixed scale alpha / r, what PEFT users run today), nonzero B."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    alpha = rank if alpha is None else alpha
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0)
    layer = Linear(base.requires_grad_(False), adapter_name="default", config=config, r=rank, lora_alpha=alpha,
                   lora_dropout=0.0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer
