"""``FusedMetaAdapter``: a bottleneck adapter (AdaptFormer or Houlsby) whose output is scaled by a learnable gamma,
and the wrappers that place one beside (:class:`ParallelAdapter`) or after (:class:`SequentialAdapter`) a sub-block."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from metapeft.layers.base import MetaPEFTModule, check_gamma_granularity, module_tensors
from metapeft.ops.adapter_op import ADAPTER, check_adapter_params
from metapeft.ops.adapter_torch import ADAPTER_ACTIVATIONS

ADAPTER_KINDS = ("parallel", "sequential")
_OP_TENSORS = ("down_weight", "down_bias", "up_weight", "up_bias", "modulator")  # what a forward passes the op


class FusedMetaAdapter(MetaPEFTModule):
    """Bottleneck adapter scaled by ``gamma * alpha``: ``out = residual + gamma * alpha * up(act(down(drop(x))))``.

    ``kind="parallel"`` (AdaptFormer, beside an MLP sub-block): ``forward(x, residual=mlp(LN(x)))``.
    ``kind="sequential"`` (Houlsby, after a sub-layer with output h): ``forward(h)`` returns
    ``h + gamma * alpha * up(act(down(h)))``.

    Args:
        dim: D, the feature size of x and of the output.
        bottleneck: b >= 1, the adapter's hidden size.
        alpha: fixed scale multiplying gamma (the adapter's scaling factor s).
        kind: ``"parallel"`` (needs ``residual``) or ``"sequential"`` (takes none: the residual is x).
        activation: ``"relu"`` (AdaptFormer) or ``"gelu"`` (exact, like ``nn.GELU()``).
        dropout: input dropout probability on the adapter branch (training mode only).
        init_gamma: gamma at initialisation (1 makes the first step the plain adapter).
        constraint: ``"softplus"`` (gamma = softplus(modulator), the paper) or ``"none"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (an explicit backend without adapter kernels raises).
        meta: learnable modulator (``True``) or a fixed scale (``False``, the plain-adapter baseline).
        gamma: ``"scalar"`` (one gamma, the paper) or ``"channel"`` (one per output channel, D of them: the authors'
            code's modulator vector; ``out = residual + gamma * alpha * up(...)`` column by column).

    Parameters (float32; move them with ``.to(device, dtype)``): ``down_weight`` (b, D), kaiming-uniform like
    LoRA's A; ``down_bias`` (b,), zeros; ``up_weight`` (D, b), zeros; ``up_bias`` (D,), zeros (so the adapter
    adds nothing at init); ``modulator`` (1,) or (D,) (``gamma="channel"``), float64 when the module is cast to
    float64, float32 otherwise.
    Input x (..., D) and residual (..., D) of the parameters' dtype (or any float dtype under autocast); output
    (..., D).

    Adapters cannot be merged into a frozen weight (the activation sits between the two projections), so there
    is no ``merge()``: inference runs the same fused op, which stores nothing for backward under ``no_grad``.
    """

    peft_parameter_names = ("down_weight", "down_bias", "up_weight", "up_bias")

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        alpha: float = 1.0,
        kind: str = "parallel",
        activation: str = "relu",
        dropout: float = 0.0,
        init_gamma: float = 1.0,
        constraint: str = "softplus",
        backend: str = "auto",
        meta: bool = True,
        gamma: str = "scalar",
    ) -> None:
        super().__init__()
        self.granularity = check_gamma_granularity(gamma)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive int, got {bottleneck!r}")
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"kind must be one of {ADAPTER_KINDS}, got {kind!r}")
        if activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {ADAPTER_ACTIVATIONS}, got {activation!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha < math.inf:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim, self.bottleneck, self.kind, self.activation = dim, bottleneck, kind, activation
        self.alpha, self.dropout = float(alpha), float(dropout)
        self.down_weight = nn.Parameter(torch.empty(bottleneck, dim))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck))
        self.up_weight = nn.Parameter(torch.zeros(dim, bottleneck))
        self.up_bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        self._init_modulator(dim if gamma == "channel" else 1, init_gamma, constraint, meta, backend, self.down_weight)
        self.check_parameters()

    def scale(self) -> torch.Tensor:
        """The adapter scale ``gamma * alpha``: (1,), or (D,) with ``gamma="channel"``; differentiable in the
        modulator."""
        return self.gamma * self.alpha

    def check_parameters(self) -> None:
        """The adapter op's checks on the four PEFT weights and the scale."""
        check_adapter_params(self.down_weight, self.down_bias, self.up_weight, self.up_bias, self.scale(),
                             self.activation, self.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., dim) -> (..., dim); ``residual`` (..., dim) is required for ``kind="parallel"`` and refused for
        ``kind="sequential"`` (whose residual is x itself)."""
        if (residual is None) != (self.kind == "sequential"):
            if residual is None:
                raise ValueError("a parallel (AdaptFormer) FusedMetaAdapter needs residual=mlp(LN(x)) in forward")
            raise ValueError("a sequential (Houlsby) FusedMetaAdapter adds to its input x: pass no residual")
        *weights, modulator = module_tensors(self, _OP_TENSORS)
        self.check_modulator(modulator)
        return self.run_op(ADAPTER, x, (residual, *weights), modulator, self.constraint, self.alpha,
                           (self.activation,))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, bottleneck={self.bottleneck}, alpha={self.alpha}, kind={self.kind!r}, "
                f"activation={self.activation!r}, dropout={self.dropout}, constraint={self.constraint!r}, "
                f"meta={self.meta}, backend={self.backend!r}, gamma={self.granularity!r}")


class ParallelAdapter(nn.Module):
    """AdaptFormer beside a sub-block: ``module(x) + gamma * alpha * up(act(down(x)))``; x (..., dim) -> (..., dim)."""

    def __init__(self, module: nn.Module, adapter: MetaPEFTModule) -> None:
        super().__init__()
        self.module, self.adapter = module, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x, residual=self.module(x))


class SequentialAdapter(nn.Module):
    """Houlsby adapter after a sub-layer: ``h + gamma * alpha * up(act(down(h)))`` with ``h = module(*args)``;
    h (..., dim). Keyword arguments (e.g. timm's ``attn_mask``) pass through to ``module``."""

    def __init__(self, module: nn.Module, adapter: MetaPEFTModule) -> None:
        super().__init__()
        self.module, self.adapter = module, adapter

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.module(*args, **kwargs))
