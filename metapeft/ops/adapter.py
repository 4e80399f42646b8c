"""The adapter op: registration (``metapeft::adapter_fwd`` / ``_bwd``), fake kernels, autograd, dispatch.

    out = (x if residual is None else residual) + scale * (act(drop(x) down^T + down_b) up^T + up_b)

AdaptFormer (parallel) passes ``residual = mlp(LN(x))``; the Houlsby adapter (sequential) passes none.
Shapes and dtypes: x (M, D), residual (M, D) or None, down_weight (b, D), down_bias (b,) or None,
up_weight (D, b), up_bias (D,) or None, all of one floating dtype on one device; scale (1,) = gamma * alpha
on the same device, any float dtype (a tensor with a real gradient: changing it never recompiles and never
syncs the host). ``activation`` is ``"relu"`` or ``"gelu"``.

Backward (the math is in :mod:`metapeft.ops.adapter_torch`): saved are x, the weights, the scale and the
bottleneck z (M, b); never a tensor of size M x D beyond x itself, never a dropout mask. The residual's
gradient is dOut itself; d scale is reduced from (D, b) or (M, b) tensors, never an M x D product.

Meta-gradient readiness: first-order backward runs the selected backend's kernels. Double backward is
supported: when the backward runs with grad mode on (``create_graph=True``) it is computed from
differentiable ATen ops, with ``z`` recomputed from x. Forward-mode AD is supported by :func:`adapter`:
inside ``torch.func.jvp`` or a ``forward_ad.dual_level`` it computes the same forward from differentiable
ATen ops. The raw ``torch.ops.metapeft.adapter_fwd`` op has no jvp rule, and PyTorch then silently gives it a
zero (``torch.func.jvp``) or no (``forward_ad``) tangent: call it only through :func:`adapter`.
"""

from __future__ import annotations

import os

import torch

from metapeft.ops.adapter_torch import (
    ADAPTER_ACTIVATIONS,
    adapter_bwd_torch,
    adapter_fwd_torch,
    adapter_recompute_z,
)
from metapeft.ops.backends import BACKEND_ENV, get_backend, select_backend
from metapeft.ops.checks import check_finite, check_floating, check_same
from metapeft.ops.dropout import backend_dropout_factors
from metapeft.ops.scaled_lora import forward_ad_active

_FWD_IMPLS = {"torch": adapter_fwd_torch}
_BWD_IMPLS = {"torch": adapter_bwd_torch}


def register_adapter_impl(backend: str, fwd, bwd) -> None:
    """Plug a backend's forward and backward launchers (same signatures as the torch ones) into the op."""
    _FWD_IMPLS[backend] = fwd
    _BWD_IMPLS[backend] = bwd


@torch.library.custom_op("metapeft::adapter_fwd", mutates_args=())
def adapter_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: torch.Tensor,
    activation: str,
    dropout_p: float,
    seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on 2-D x; returns ``(out (M, D), z (M, b))``. ``z`` is saved for backward, not a user output."""
    return _FWD_IMPLS[backend](x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation,
                               dropout_p, seed)


@adapter_fwd.register_fake
def _(x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p, seed, backend):
    return x.new_empty((x.shape[0], up_weight.shape[0])), x.new_empty((x.shape[0], down_weight.shape[0]))


@torch.library.custom_op("metapeft::adapter_bwd", mutates_args=())
def adapter_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: torch.Tensor,
    z: torch.Tensor,
    activation: str,
    dropout_p: float,
    seed: int,
    residual_is_x: bool,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward; returns ``(dx, d down_weight, d down_bias, d up_weight, d up_bias, d scale)``, an empty tensor
    where ``needs`` is False. ``dx`` includes ``grad_out`` when ``residual_is_x``."""
    grads = _BWD_IMPLS[backend](grad_out, x, down_weight, up_weight, up_bias, scale, z, activation, dropout_p, seed,
                                residual_is_x, tuple(needs))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@adapter_bwd.register_fake
def _(grad_out, x, down_weight, up_weight, up_bias, scale, z, activation, dropout_p, seed, residual_is_x, backend,
      needs):
    shapes = (x.shape, down_weight.shape, down_weight.shape[:1], up_weight.shape, up_weight.shape[:1], scale.shape)
    owners = (x, x, x, x, x, scale)
    return tuple(owner.new_empty(shape if need else (0,)) for owner, shape, need in zip(owners, shapes, needs))


def _setup_context(ctx, inputs, output):
    x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias, scale, output[1])
    ctx.activation, ctx.dropout_p, ctx.seed, ctx.backend = activation, dropout_p, seed, backend
    ctx.residual_is_x = residual is None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_z):
    x, down_weight, down_bias, up_weight, up_bias, scale, z = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = (need[0], need[2], need[3], need[4], need[5], need[6])
    args = (ctx.activation, ctx.dropout_p, ctx.seed, ctx.residual_is_x)
    if torch.is_grad_enabled():
        factors = backend_dropout_factors(ctx.backend)
        z = adapter_recompute_z(x, down_weight, down_bias, ctx.dropout_p, ctx.seed, factors)
        grads = adapter_bwd_torch(grad_out, x, down_weight, up_weight, up_bias, scale, z, *args, needs, factors)
    else:
        grads = adapter_bwd(grad_out, x, down_weight, up_weight, up_bias, scale, z, *args, ctx.backend, list(needs))
        grads = tuple(g if n else None for g, n in zip(grads, needs))
    dx, ddown_w, ddown_b, dup_w, dup_b, dscale = grads
    dresidual = grad_out if need[1] else None
    return dx, dresidual, ddown_w, ddown_b, dup_w, dup_b, dscale, None, None, None, None


adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


def select_adapter_backend(requested: str, x: torch.Tensor) -> str:
    """Resolve ``requested`` ("auto" or a backend name) for an adapter input ``x`` via :func:`select_backend`.

    Only backends with an adapter implementation qualify: when ``"auto"`` picks one without (the CUDA
    extension has no adapter kernels) the next capable backend in auto order runs; an explicit request for one
    raises a ``RuntimeError``.
    """
    chosen = select_backend(requested, x)
    if chosen in _FWD_IMPLS:
        return chosen
    if requested == "auto" and (os.environ.get(BACKEND_ENV) or "auto") == "auto":
        for name in ("triton", "torch"):
            if name in _FWD_IMPLS and not get_backend(name).not_supported_reasons(x):
                return name
    raise RuntimeError(f"backend {chosen!r} has no adapter implementation; adapter backends: {sorted(_FWD_IMPLS)}")


def check_adapter_inputs(x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p):
    """Raise a ``ValueError``/``TypeError`` naming the first bad argument of :func:`adapter`."""
    check_floating(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., dim), got shape {tuple(x.shape)}")
    for name, t, ndim in (("down_weight", down_weight, 2), ("up_weight", up_weight, 2), ("scale", scale, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    optional = (("residual", residual), ("down_bias", down_bias), ("up_bias", up_bias))
    for name, t in (*optional, ("down_weight", down_weight), ("up_weight", up_weight)):
        if t is not None:
            check_same(t, x, name, "x")
    check_floating(scale, "scale")
    if scale.device != x.device:
        raise ValueError(f"scale must be on x's device {x.device}, got {scale.device}")
    bottleneck, dim = down_weight.shape
    if x.shape[-1] != dim:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal down_weight's in_features ({dim})")
    if bottleneck < 1:
        raise ValueError(f"bottleneck (down_weight's rows) must be >= 1, got {bottleneck}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if tuple(up_weight.shape) != (dim, bottleneck):
        raise ValueError(f"up_weight must have shape (dim, bottleneck) = ({dim}, {bottleneck}), "
                         f"got {tuple(up_weight.shape)}")
    for name, t, size in (("down_bias", down_bias, bottleneck), ("up_bias", up_bias, dim)):
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    if tuple(scale.shape) != (1,):
        raise ValueError(f"scale must have shape (1,), got {tuple(scale.shape)}")
    if activation not in ADAPTER_ACTIVATIONS:
        raise ValueError(f"activation must be one of {ADAPTER_ACTIVATIONS}, got {activation!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    check_finite(scale, "scale")


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
    seed: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused adapter: ``x (..., D) -> (..., D)``; see the module docstring for the math and shapes.

    ``residual`` (..., D) or None (the residual is x: the sequential, Houlsby form). ``scale`` (1,) is usually
    ``gamma * alpha``. ``backend`` is "auto" (by device, overridden by ``METAPEFT_BACKEND``) or a backend name;
    an unavailable backend raises, it never falls back.
    """
    check_adapter_inputs(x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p)
    backend = select_adapter_backend(backend, x)
    x2d = x.reshape(-1, x.shape[-1])
    residual2d = None if residual is None else residual.reshape(-1, x.shape[-1])
    args = (x2d, residual2d, down_weight, down_bias, up_weight, up_bias, scale, activation, float(dropout_p), int(seed))
    if forward_ad_active():
        return adapter_fwd_torch(*args, backend_dropout_factors(backend))[0].view(x.shape)
    return adapter_fwd(*args, backend)[0].view(x.shape)
