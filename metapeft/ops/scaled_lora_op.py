"""The scaled-LoRA op family: its arguments, its math spec and its public function (``metapeft::scaled_lora_fwd``
/ ``_bwd``; the custom ops, autograd and routes are the shared skeleton of :mod:`metapeft.ops.family`).

    y[:, seg j] = x W^T[:, seg j] + bias[seg j] + scale_j * (drop(x) A_j^T) B_j^T        scale (S,)
    y[:, n]     = x W^T[:, n] + bias[n] + scale_n * (drop(x) A_j^T) B_j[n]^T            scale (N,), n in seg j

Shapes and dtypes: x (M, K), weight (N, K), bias (N,) or None, lora_A (S*r, K), lora_B (N, r), all of
one floating dtype on one device; scale (S,) (one per segment, the paper's gamma) or (N,) (one per output
channel, the authors' code's modulator vector) on the same device, any float dtype (a tensor with a real
gradient, never a Python float: changing it never recompiles and never syncs the host).
Segment j is the j-th equal slice of the N outputs (S = 3 for a fused qkv projection); S = lora_A's rows / r.

Backward, from dY, with ``T_j = dY_j B_j (M, r)`` (the math is in :mod:`metapeft.ops.scaled_lora_torch`):

    d scale_j = sum(T_j * h_j);  dB_j = scale_j dY_j^T h_j;  dA_j = scale_j T_j^T drop(x);
    dx = dY W + drop'((scale T) A);  dW = dY^T x;  dbias = sum_m dY_m
    per channel (scale c (N,)): d c_n = sum_k (dY_j^T h_j)[n, k] B[n, k]; dB = c[:, None] * dY_j^T h_j;
    T_j = dY_j (c[:, None] * B)_j in dA and dx

Saved: x (alive anyway), the weights and ``h = drop(x) A^T (M, S*r)``; never an M x N tensor, never a mask.
Double backward, forward-mode AD and ``torch.func`` transforms: see :mod:`metapeft.ops.family`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from metapeft.ops.checks import check_finite, check_params
from metapeft.ops.dropout import device_seed, seeded_dropout
from metapeft.ops.family import FusedOp, OpSpec
from metapeft.ops.scaled_lora_torch import scaled_lora_bwd_torch, scaled_lora_fwd_torch


class ScaledLoRAArgs(NamedTuple):
    """The scaled-LoRA op's tensors besides x and the scale (the order of its schema)."""

    weight: torch.Tensor  # (N, K), frozen
    bias: torch.Tensor | None  # (N,)
    lora_A: torch.Tensor  # (S*r, K)
    lora_B: torch.Tensor  # (N, r)


def _recompute_h(x, args, dropout_p, seed, factors):
    return seeded_dropout(x, dropout_p, seed, factors) @ args[2].t()


SCALED_LORA = FusedOp(OpSpec(
    "scaled_lora", ScaledLoRAArgs, scaled_lora_fwd_torch, scaled_lora_bwd_torch, _recompute_h, (0, "weight"),
    backward_reads=(0, 2, 3), grad_args=(0, 1, 2, 3), kept="h", grad="grad_y",  # the backward reads weight, A, B
    fake_forward=lambda x, weight, bias, lora_A, lora_B: (x.new_empty((x.shape[0], weight.shape[0])),
                                                          x.new_empty((x.shape[0], lora_A.shape[0]))),
    fake_grads=lambda x, weight, lora_A, lora_B, scale: (x.shape, weight.shape, weight.shape[:1], lora_A.shape,
                                                         lora_B.shape, scale.shape)))
scaled_lora_fwd, scaled_lora_bwd = SCALED_LORA.fwd, SCALED_LORA.bwd


def check_scaled_lora_params(weight, bias, lora_A, lora_B, scale, dropout_p) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the first bad argument of :func:`scaled_lora` other than x.

    Layers run it when they are built and when their parameters change, not per call.
    """
    check_params({"weight": (weight, 2), "bias": (bias, None), "lora_A": (lora_A, 2), "lora_B": (lora_B, 2)}, scale,
                 dropout_p)
    out_features, in_features = weight.shape
    rank = lora_B.shape[1]
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if rank < 1:
        raise ValueError(f"rank (lora_B's columns) must be in [1, min(in_features, out_features/segments)], got {rank}")
    segments = max(lora_A.shape[0] // rank, 1)
    if tuple(lora_A.shape) != (segments * rank, in_features):
        raise ValueError(f"lora_A must have shape (segments*rank, in_features) = ({segments * rank}, {in_features}), "
                         f"got {tuple(lora_A.shape)}")
    if out_features % segments != 0:
        raise ValueError(f"lora_A holds {segments} segments (rank blocks), which must divide out_features "
                         f"({out_features})")
    if not rank <= min(in_features, out_features // segments):
        raise ValueError(f"rank (lora_B's columns) must be in [1, min(in_features, out_features/segments)] = "
                         f"[1, {min(in_features, out_features // segments)}], got {rank}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must have shape (out_features, rank) = ({out_features}, {rank}), "
                         f"got {tuple(lora_B.shape)}")
    if scale.shape[0] not in (segments, out_features):
        raise ValueError(f"scale must have shape (segments,) = ({segments},) (one per segment) or (out_features,) "
                         f"= ({out_features},) (one per output channel), got {tuple(scale.shape)}")


def scaled_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    dropout_p: float = 0.0,
    seed: torch.Tensor | int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled LoRA linear: ``x (..., K) -> y (..., N)``; see the module docstring for the math and shapes.

    ``scale`` (S,) or (N,) is usually ``gamma * alpha / r`` (one gamma per segment or per output channel).
    ``backend`` is "auto" (by device, overridden by ``METAPEFT_BACKEND``) or a backend name; an unavailable
    backend raises, it never falls back. ``seed``: an int or an int64 scalar tensor (see
    :mod:`metapeft.ops.dropout`). Checks every argument (``scale`` must be finite) on each call; layers check
    their parameters once instead.
    """
    check_scaled_lora_params(weight, bias, lora_A, lora_B, scale, dropout_p)
    check_finite(scale, "scale")
    return SCALED_LORA.call(x, ScaledLoRAArgs(weight, bias, lora_A, lora_B), scale, "none", 1.0, (), float(dropout_p),
                            device_seed(seed, dropout_p, x), backend)[0]
