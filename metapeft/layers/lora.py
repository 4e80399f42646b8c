"""``FusedMetaLoRA``: a frozen ``nn.Linear`` plus a LoRA whose output is scaled by a learnable gamma."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from metapeft.layers.base import MetaPEFTModule, check_gamma_granularity, module_tensors
from metapeft.ops.scaled_lora_op import SCALED_LORA, check_scaled_lora_params


class FusedMetaLoRA(MetaPEFTModule):
    """LoRA on a frozen Linear, per-segment (or per-output-channel) scaled by ``gamma * alpha / rank``.

    ``y[..., seg j] = base(x)[..., seg j] + gamma_j * alpha / rank * (drop(x) A_j^T) B_j^T``; with
    ``gamma="channel"`` gamma is a vector over the outputs: ``y[..., n] = base(x)[..., n] + gamma_n * alpha / rank *
    (drop(x) A_j^T) B_j[n]^T`` for output n of segment j.

    Args:
        base: the ``nn.Linear`` to adapt (frozen here); weight (N, K), bias (N,) or None.
        rank: r, in ``[1, min(K, N / segments)]``.
        alpha: LoRA alpha; ``None`` means ``alpha = rank``.
        segments: S, the number of equal output slices with their own LoRA and gamma (3 for timm's
            fused ``qkv``).
        active_segments: which of the S slices carry a LoRA (default all), e.g. ``(0, 2)`` for q and v
            only; inactive slices equal the base output.
        dropout: LoRA input dropout probability (training mode only).
        init_gamma: gamma at initialisation (1 makes the first step plain LoRA).
        constraint: ``"softplus"`` (gamma = softplus(modulator), the paper) or ``"none"``.
        meta: learnable modulator (``True``) or a fixed scale (``False``, the plain-LoRA baseline).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        gamma: ``"scalar"`` (one gamma per active segment, the paper) or ``"channel"`` (one per output channel of
            the active segments, the authors' code's modulator vector).

    Parameters: ``lora_A`` (S_a*r, K), kaiming-uniform; ``lora_B`` (S_a*N/S, r), zeros (so the layer
    equals ``base`` at init); ``modulator`` (S_a,) or, with ``gamma="channel"``, (S_a*N/S,), where S_a = number of
    active segments, float64 on a float64 base and float32 otherwise.
    Input x: (..., K) of any float dtype matching the base (or under autocast); output (..., N).
    """

    peft_parameter_names = ("lora_A", "lora_B")

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        segments: int = 1,
        dropout: float = 0.0,
        init_gamma: float = 1.0,
        constraint: str = "softplus",
        backend: str = "auto",
        active_segments: tuple[int, ...] | None = None,
        meta: bool = True,
        gamma: str = "scalar",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        out_features, in_features = base.out_features, base.in_features
        if not isinstance(segments, int) or segments < 1 or out_features % segments != 0:
            raise ValueError(f"segments must be a positive int dividing out_features ({out_features}), got {segments}")
        max_rank = min(in_features, out_features // segments)
        if not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise ValueError(f"rank must be an int in [1, min(in_features, out_features/segments)] = "
                             f"[1, {max_rank}], got {rank}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                                  or not 0.0 < alpha < math.inf):
            raise ValueError(f"alpha must be None (the rank) or a finite number > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        active = tuple(range(segments)) if active_segments is None else tuple(active_segments)
        if not active or len(set(active)) != len(active) or not all(0 <= j < segments for j in active):
            raise ValueError(f"active_segments must be distinct indices in [0, {segments}), got {active_segments}")
        self.granularity = check_gamma_granularity(gamma)
        self.base = base.requires_grad_(False)
        self.rank, self.segments, self.active_segments = rank, segments, tuple(sorted(active))
        self.all_segments_active = len(active) == segments
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout = float(dropout)
        self.merged = False
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        per_segment = out_features // segments
        self.lora_A = nn.Parameter(torch.empty(len(active) * rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(len(active) * per_segment, rank, **factory))
        for block in self.lora_A.data.split(rank):
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        per_gamma = per_segment if gamma == "channel" else 1  # the outputs each gamma scales
        self._init_modulator(len(active) * per_gamma, init_gamma, constraint, meta, backend, base.weight)
        # the scale entries of the active segments as a device buffer: building the scale never copies from the host
        index = [j * per_gamma + i for j in self.active_segments for i in range(per_gamma)]
        self.register_buffer("active_index", torch.tensor(index, device=base.weight.device), persistent=False)
        self.check_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def scale(self) -> torch.Tensor:
        """The LoRA scale ``gamma * alpha / rank`` the op takes: (S,) per segment, or (N,) per output channel with
        ``gamma="channel"``; zero on inactive segments."""
        active_scale = self.gamma * (self.alpha / self.rank)
        if self.all_segments_active:
            return active_scale
        size = self.out_features if self.granularity == "channel" else self.segments
        return active_scale.new_zeros(size).index_copy(0, self.active_index, active_scale)

    def output_scale(self) -> torch.Tensor:
        """The scale of every output channel: (N,), a segment's scale repeated over its outputs (``gamma="scalar"``),
        zero on inactive segments."""
        scale = self.scale()
        return scale.repeat_interleave(self.out_features // scale.shape[0])

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (S*r, K), B (N, r))`` over all S segments, zero blocks for inactive ones (differentiable)."""
        if self.all_segments_active:
            return self.lora_A, self.lora_B
        a_blocks, b_blocks = self.lora_A.split(self.rank), self.lora_B.split(self.out_features // self.segments)
        zeros_a, zeros_b = torch.zeros_like(a_blocks[0]), torch.zeros_like(b_blocks[0])
        position = {j: i for i, j in enumerate(self.active_segments)}
        full_a = [a_blocks[position[j]] if j in position else zeros_a for j in range(self.segments)]
        full_b = [b_blocks[position[j]] if j in position else zeros_b for j in range(self.segments)]
        return torch.cat(full_a), torch.cat(full_b)

    def check_parameters(self) -> None:
        """The scaled-LoRA op's checks on the base weight and bias, the LoRA factors and the scale."""
        lora_A, lora_B = self.lora_factors()
        check_scaled_lora_params(self.base.weight, self.base.bias, lora_A, lora_B, self.scale(), self.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if self.merged:
            return self.base(x)
        lora_A, lora_B, modulator = module_tensors(self, ("lora_A", "lora_B", "modulator"))
        self.check_modulator(modulator)
        weight, bias = module_tensors(self.base, ("weight", "bias"))
        if self.all_segments_active:  # the op computes gamma * alpha / r itself
            return self.run_op(SCALED_LORA, x, (weight, bias, lora_A, lora_B), modulator, self.constraint,
                               self.alpha / self.rank)
        lora_A, lora_B = self.lora_factors()
        return self.run_op(SCALED_LORA, x, (weight, bias, lora_A, lora_B), self.scale(), "none", 1.0)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The LoRA update folded into a weight: ``diag(scale) B_j A_j`` per segment (the scale of each output row),
        (N, K) in float32 or wider."""
        lora_A, lora_B = self.lora_factors()
        compute = torch.promote_types(lora_A.dtype, torch.float32)
        per_segment = self.out_features // self.segments
        blocks = [b.to(compute) @ a.to(compute) for a, b in zip(lora_A.split(self.rank), lora_B.split(per_segment))]
        return torch.cat(blocks) * self.output_scale().to(compute).unsqueeze(1)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the scaled LoRA into ``base.weight`` for zero-overhead inference (PEFT weights must not change
        until :meth:`unmerge`)."""
        if self.merged:
            raise RuntimeError("FusedMetaLoRA is already merged")
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged update from ``base.weight`` again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("FusedMetaLoRA is not merged")
        self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, segments={self.segments}, active_segments={self.active_segments}, "
                f"dropout={self.dropout}, constraint={self.constraint!r}, meta={self.meta}, backend={self.backend!r}, "
                f"gamma={self.granularity!r}")
