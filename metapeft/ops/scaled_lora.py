"""The scaled-LoRA op: registration (``metapeft::scaled_lora_fwd`` / ``_bwd``), fake kernels, autograd, dispatch.

    y[:, seg j] = x W^T[:, seg j] + bias[seg j] + scale_j * (drop(x) A_j^T) B_j^T

Shapes and dtypes: x (M, K), weight (N, K), bias (N,) or None, lora_A (S*r, K), lora_B (N, r), all of
one floating dtype on one device; scale (S,) on the same device, any float dtype (a tensor with a
real gradient, never a Python float: changing it never recompiles and never syncs the host).
Segment j is the j-th equal slice of the N outputs (S = 3 for a fused qkv projection).

Meta-gradient readiness: first-order backward runs the selected backend's fused kernels. Double
backward is supported: when the backward runs with grad mode on (``create_graph=True``) it is
computed from differentiable ATen ops, with ``h`` recomputed from x and A. Forward-mode AD is
supported by :func:`scaled_lora`: inside ``torch.func.jvp`` or a ``forward_ad.dual_level`` it computes
the same forward from differentiable ATen ops (the raw ``torch.ops.metapeft.scaled_lora_fwd`` op has no
jvp rule: call it only through :func:`scaled_lora`).
"""

from __future__ import annotations

import torch

from metapeft.ops.backends import select_backend
from metapeft.ops.checks import check_finite, check_floating, check_same
from metapeft.ops.dropout import backend_dropout_factors, seeded_dropout
from metapeft.ops.scaled_lora_torch import scaled_lora_bwd_torch, scaled_lora_composite, scaled_lora_fwd_torch

_FWD_IMPLS = {"torch": scaled_lora_fwd_torch}
_BWD_IMPLS = {"torch": scaled_lora_bwd_torch}


def register_scaled_lora_impl(backend: str, fwd, bwd) -> None:
    """Plug a backend's forward and backward launchers (same signatures as the torch ones) into the op; its
    dropout mask is declared once for all ops with ``metapeft.ops.dropout.register_dropout_factors``."""
    _FWD_IMPLS[backend] = fwd
    _BWD_IMPLS[backend] = bwd


@torch.library.custom_op("metapeft::scaled_lora_fwd", mutates_args=())
def scaled_lora_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    dropout_p: float,
    seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on 2-D x; returns ``(y (M, N), h (M, S*r))``. ``h`` is saved for backward, not a user output."""
    return _FWD_IMPLS[backend](x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


@scaled_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, backend):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    h = x.new_empty((x.shape[0], lora_A.shape[0]))
    return y, h


@torch.library.custom_op("metapeft::scaled_lora_bwd", mutates_args=())
def scaled_lora_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    h: torch.Tensor,
    dropout_p: float,
    seed: int,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward; returns ``(dx, dweight, dbias, dA, dB, dscale)``, an empty tensor where ``needs`` is False."""
    grads = _BWD_IMPLS[backend](grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, tuple(needs))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@scaled_lora_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, backend, needs):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape, scale.shape)
    owners = (x, x, x, x, x, scale)
    return tuple(owner.new_empty(shape if need else (0,)) for owner, shape, need in zip(owners, shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, scale, output[1])
    ctx.dropout_p, ctx.seed, ctx.backend = dropout_p, seed, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_h):
    x, weight, lora_A, lora_B, scale, h = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:6])
    if torch.is_grad_enabled():
        factors = backend_dropout_factors(ctx.backend)
        h = seeded_dropout(x, ctx.dropout_p, ctx.seed, factors) @ lora_A.t()
        grads = scaled_lora_bwd_torch(grad_y, x, weight, lora_A, lora_B, scale, h, ctx.dropout_p, ctx.seed, needs,
                                      factors)
    else:
        grads = scaled_lora_bwd(grad_y, x, weight, lora_A, lora_B, scale, h, ctx.dropout_p, ctx.seed, ctx.backend,
                                list(needs))
        grads = tuple(g if need else None for g, need in zip(grads, needs))
    return (*grads, None, None, None)


scaled_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def forward_ad_active() -> bool:
    """True inside ``torch.func.jvp`` or a ``torch.autograd.forward_ad.dual_level`` (never while compiling)."""
    return not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level >= 0


def check_scaled_lora_inputs(x, weight, bias, lora_A, lora_B, scale, dropout_p) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the first bad argument of :func:`scaled_lora`."""
    check_floating(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features), got shape {tuple(x.shape)}")
    for name, t, ndim in (("weight", weight, 2), ("lora_A", lora_A, 2), ("lora_B", lora_B, 2), ("scale", scale, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None:
            check_same(t, x, name, "x")
    check_floating(scale, "scale")
    if scale.device != x.device:
        raise ValueError(f"scale must be on x's device {x.device}, got {scale.device}")
    out_features, in_features = weight.shape
    segments, rank = scale.shape[0], lora_B.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features ({in_features})")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if segments < 1 or out_features % segments != 0:
        raise ValueError(f"scale has {segments} segments, which must divide out_features ({out_features})")
    if not 1 <= rank <= min(in_features, out_features // segments):
        raise ValueError(f"rank (lora_B's columns) must be in [1, min(in_features, out_features/segments)] = "
                         f"[1, {min(in_features, out_features // segments)}], got {rank}")
    if tuple(lora_A.shape) != (segments * rank, in_features):
        raise ValueError(f"lora_A must have shape (segments*rank, in_features) = ({segments * rank}, {in_features}), "
                         f"got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must have shape (out_features, rank) = ({out_features}, {rank}), "
                         f"got {tuple(lora_B.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    check_finite(scale, "scale")


def scaled_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled LoRA linear: ``x (..., K) -> y (..., N)``; see the module docstring for the math and shapes.

    ``scale`` (S,) is usually ``gamma * alpha / r``. ``backend`` is "auto" (by device, overridden by
    ``METAPEFT_BACKEND``) or a backend name; an unavailable backend raises, it never falls back.
    """
    check_scaled_lora_inputs(x, weight, bias, lora_A, lora_B, scale, dropout_p)
    backend = select_backend(backend, x)
    x2d = x.reshape(-1, x.shape[-1])
    if forward_ad_active():
        y = scaled_lora_composite(x2d, weight, bias, lora_A, lora_B, scale, float(dropout_p), int(seed),
                                  backend_dropout_factors(backend))
        return y.view(*x.shape[:-1], weight.shape[0])
    y, _ = scaled_lora_fwd(x2d, weight, bias, lora_A, lora_B, scale, float(dropout_p), int(seed), backend)
    return y.view(*x.shape[:-1], weight.shape[0])
