"""The adapter op family: its arguments, its math spec and its public function (``metapeft::adapter_fwd`` /
``_bwd``; the custom ops, autograd and routes are the shared skeleton of :mod:`metapeft.ops.family`).

    out = (x if residual is None else residual) + scale * (act(drop(x) down^T + down_b) up^T + up_b)

AdaptFormer (parallel) passes ``residual = mlp(LN(x))``; the Houlsby adapter (sequential) passes none.
Shapes and dtypes: x (M, D), residual (M, D) or None, down_weight (b, D), down_bias (b,) or None,
up_weight (D, b), up_bias (D,) or None, all of one floating dtype on one device; scale (1,) = gamma * alpha, or
(D,): one per output channel (the authors' code's modulator vector), ``out = residual + scale * (...)`` per column,
on the same device, any float dtype (a tensor with a real gradient: changing it never recompiles and never
syncs the host). ``activation`` is ``"relu"`` or ``"gelu"``.

Backward (the math is in :mod:`metapeft.ops.adapter_torch`): saved are x, the weights, the scale and the
bottleneck z (M, b); never a tensor of size M x D beyond x itself, never a dropout mask. The residual's
gradient is dOut itself; d scale is reduced from (D, b) or (M, b) tensors, never an M x D product.
Double backward, forward-mode AD and ``torch.func`` transforms: see :mod:`metapeft.ops.family`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from metapeft.ops.adapter_torch import (
    ADAPTER_ACTIVATIONS,
    adapter_bwd_torch,
    adapter_fwd_torch,
    adapter_recompute_z,
)
from metapeft.ops.checks import check_finite, check_params
from metapeft.ops.dropout import device_seed
from metapeft.ops.family import FusedOp, OpSpec


class AdapterArgs(NamedTuple):
    """The adapter op's tensors besides x and the scale (the order of its schema)."""

    residual: torch.Tensor | None  # (M, D); None: the residual is x (Houlsby)
    down_weight: torch.Tensor  # (b, D)
    down_bias: torch.Tensor | None  # (b,)
    up_weight: torch.Tensor  # (D, b)
    up_bias: torch.Tensor | None  # (D,)


def _recompute_z(x, args, dropout_p, seed, factors):
    return adapter_recompute_z(x, args[1], args[2], dropout_p, seed, factors)


ADAPTER = FusedOp(OpSpec(
    "adapter", AdapterArgs, adapter_fwd_torch, adapter_bwd_torch, _recompute_z, (1, "down_weight"),
    extra=("str activation",), composite_nd=True, kept="z", grad="grad_out",
    backward_reads=(1, 3, 4), grad_args=(1, 2, 3, 4),  # the backward reads down_weight, up_weight, up_bias
    passthrough=(0,), backward_flags=("bool residual_is_x",), flags=lambda args: (args[0] is None,),  # the residual
    fake_forward=lambda x, residual, down_w, down_b, up_w, up_b: (x.new_empty((x.shape[0], up_w.shape[0])),
                                                                  x.new_empty((x.shape[0], down_w.shape[0]))),
    fake_grads=lambda x, down_w, up_w, up_b, scale: (x.shape, down_w.shape, down_w.shape[:1], up_w.shape,
                                                     up_w.shape[:1], scale.shape)))
adapter_fwd, adapter_bwd = ADAPTER.fwd, ADAPTER.bwd


def check_adapter_params(down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the first bad argument of :func:`adapter` other than x and the
    residual. Layers run it when they are built and when their parameters change, not per call."""
    check_params({"down_weight": (down_weight, 2), "down_bias": (down_bias, None), "up_weight": (up_weight, 2),
                  "up_bias": (up_bias, None)}, scale, dropout_p)
    bottleneck, dim = down_weight.shape
    if bottleneck < 1:
        raise ValueError(f"bottleneck (down_weight's rows) must be >= 1, got {bottleneck}")
    if tuple(up_weight.shape) != (dim, bottleneck):
        raise ValueError(f"up_weight must have shape (dim, bottleneck) = ({dim}, {bottleneck}), "
                         f"got {tuple(up_weight.shape)}")
    for name, t, size in (("down_bias", down_bias, bottleneck), ("up_bias", up_bias, dim)):
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    if scale.shape[0] not in (1, dim):
        raise ValueError(f"scale must have shape (1,) (one scale) or (dim,) = ({dim},) (one per output channel), "
                         f"got {tuple(scale.shape)}")
    if activation not in ADAPTER_ACTIVATIONS:
        raise ValueError(f"activation must be one of {ADAPTER_ACTIVATIONS}, got {activation!r}")


def adapter(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: torch.Tensor,
    activation: str = "relu",
    dropout_p: float = 0.0,
    seed: torch.Tensor | int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused adapter: ``x (..., D) -> (..., D)``; see the module docstring for the math and shapes.

    ``residual`` (..., D) or None (the residual is x: the sequential, Houlsby form). ``scale`` (1,) or (D,) is
    usually ``gamma * alpha`` (one gamma, or one per output channel). ``backend`` is "auto" (by device, overridden
    by ``METAPEFT_BACKEND``) or a backend name; an unavailable backend raises, it never falls back. Checks every
    argument (``scale`` must be finite) on each call; layers check their parameters once instead.
    """
    check_adapter_params(down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p)
    check_finite(scale, "scale")
    args = AdapterArgs(residual, down_weight, down_bias, up_weight, up_bias)
    return ADAPTER.call(x, args, scale, "none", 1.0, (activation,), float(dropout_p), device_seed(seed, dropout_p, x),
                        backend)[0]
