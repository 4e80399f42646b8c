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

How a call runs (:func:`adapter_call`, the only place that selects a backend) and what it supports (double
backward, forward-mode AD, ``torch.func`` transforms) follow the scaled-LoRA op: see :mod:`metapeft.ops.scaled_lora_op`.
The one differentiable torch forward is :func:`metapeft.ops.adapter_torch.adapter_fwd_torch`.
"""

from __future__ import annotations

import torch

from metapeft.modulator import gamma_from_modulator, modulator_gradient, scale_from_modulator
from metapeft.ops.adapter_torch import (
    ADAPTER_ACTIVATIONS,
    adapter_bwd_torch,
    adapter_fwd_torch,
    adapter_recompute_z,
)
from metapeft.ops.backends import DOUBLE_BACKWARD_AHEAD, OpImpl, op_impl, register_op, select_backend
from metapeft.ops.checks import (
    check_finite,
    check_floating,
    check_input,
    check_residual,
    check_same,
    transforms_active,
)
from metapeft.ops.dropout import device_seed, torch_dropout_factors

FAMILY = "adapter"


def _grads(saved, grad_out, needs, activation, dropout_p, seed, residual_is_x, backend, kernel_backward):
    """``(dx, d down_weight, d down_bias, d up_weight, d up_bias, d scale)`` (None where not needed) from the
    saved tensors; differentiable when grad mode is on (double backward), else from ``kernel_backward``."""
    x, down_weight, down_bias, up_weight, up_bias, scale, z = saved
    args = (activation, dropout_p, seed, residual_is_x, needs)
    if torch.is_grad_enabled():
        factors = op_impl(backend, FAMILY).dropout
        z = adapter_recompute_z(x, down_weight, down_bias, dropout_p, seed, factors)
        return adapter_bwd_torch(grad_out, x, down_weight, up_weight, up_bias, scale, z, *args, factors)
    return kernel_backward(grad_out, x, down_weight, up_weight, up_bias, scale, z, *args)


def _needs(need):
    return (need[0], need[2], need[3], need[4], need[5], need[6])


class _Adapter(torch.autograd.Function):
    """The eager path (see :mod:`metapeft.ops.scaled_lora_op`): x (..., D) is flattened and the scale
    ``factor * gamma(modulator)`` computed here, so that neither costs an autograd node per call."""

    @staticmethod
    def forward(ctx, x, residual, down_weight, down_bias, up_weight, up_bias, modulator, constraint, factor,
                activation, dropout_p, seed, backend):
        impl = op_impl(backend, FAMILY)
        x2d = x.reshape(-1, x.shape[-1])
        residual2d = None if residual is None else residual.reshape(x2d.shape)
        scale = scale_from_modulator(modulator, constraint, factor)
        out, z = impl.forward(x2d, residual2d, down_weight, down_bias, up_weight, up_bias, scale, activation,
                              dropout_p, seed)
        ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias, modulator, scale, z)  # x: see scaled_lora
        ctx.options = (constraint, factor, activation, dropout_p, seed, residual is None, backend, impl.backward)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, down_weight, down_bias, up_weight, up_bias, modulator, scale, z = ctx.saved_tensors
        constraint, factor, *options = ctx.options
        if torch.is_grad_enabled():  # double backward: the scale as a differentiable function of the modulator
            scale = scale_from_modulator(modulator, constraint, factor)
        need = ctx.needs_input_grad
        x2d = x.reshape(-1, x.shape[-1])
        dx, ddown_w, ddown_b, dup_w, dup_b, dscale = _grads(
            (x2d, down_weight, down_bias, up_weight, up_bias, scale, z), grad_out.reshape(x2d.shape), _needs(need),
            *options)
        dx = None if dx is None else dx.view(grad_out.shape)
        dmodulator = None if dscale is None else modulator_gradient(dscale, modulator, constraint, factor)
        return (dx, grad_out if need[1] else None, ddown_w, ddown_b, dup_w, dup_b, dmodulator,
                None, None, None, None, None, None)


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
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on 2-D x; returns ``(out (M, D), z (M, b))``. ``z`` is saved for backward, not a user output."""
    return op_impl(backend, FAMILY).forward(x, residual, down_weight, down_bias, up_weight, up_bias, scale,
                                            activation, dropout_p, seed)


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
    seed: torch.Tensor | None,
    residual_is_x: bool,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward; returns ``(dx, d down_weight, d down_bias, d up_weight, d up_bias, d scale)``, an empty tensor
    where ``needs`` is False. ``dx`` includes ``grad_out`` when ``residual_is_x``."""
    grads = op_impl(backend, FAMILY).backward(grad_out, x, down_weight, up_weight, up_bias, scale, z, activation,
                                              dropout_p, seed, residual_is_x, tuple(needs))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@adapter_bwd.register_fake
def _(grad_out, x, down_weight, up_weight, up_bias, scale, z, activation, dropout_p, seed, residual_is_x, backend,
      needs):
    shapes = (x.shape, down_weight.shape, down_weight.shape[:1], up_weight.shape, up_weight.shape[:1], scale.shape)
    owners = (x, x, x, x, x, scale)
    return tuple(owner.new_empty(shape if need else (0,)) for owner, shape, need in zip(owners, shapes, needs))


def _op_setup_context(ctx, inputs, output):
    x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias, scale, output[1])
    ctx.options = (activation, dropout_p, seed, residual is None, backend)
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, grad_out, _grad_z):
    need = ctx.needs_input_grad
    activation, dropout_p, seed, residual_is_x, backend = ctx.options

    def kernel_backward(*args):
        grads = adapter_bwd(*args[:-1], backend, list(args[-1]))
        return tuple(g if n else None for g, n in zip(grads, args[-1]))

    dx, ddown_w, ddown_b, dup_w, dup_b, dscale = _grads(ctx.saved_tensors, grad_out, _needs(need), *ctx.options,
                                                        kernel_backward)
    return dx, grad_out if need[1] else None, ddown_w, ddown_b, dup_w, dup_b, dscale, None, None, None, None


adapter_fwd.register_autograd(_op_backward, setup_context=_op_setup_context)
register_op("torch", FAMILY, OpImpl(adapter_fwd_torch, adapter_bwd_torch, torch_dropout_factors))


def check_adapter_params(down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the first bad argument of :func:`adapter` other than x and the
    residual. Layers run it when they are built and when their parameters change, not per call."""
    for name, t, ndim in (("down_weight", down_weight, 2), ("up_weight", up_weight, 2), ("scale", scale, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    check_floating(down_weight, "down_weight")
    for name, t in (("down_bias", down_bias), ("up_weight", up_weight), ("up_bias", up_bias)):
        if t is not None:
            check_same(t, down_weight, name, "down_weight")
    check_floating(scale, "scale")
    if scale.device != down_weight.device:
        raise ValueError(f"scale must be on down_weight's device {down_weight.device}, got {scale.device}")
    bottleneck, dim = down_weight.shape
    if bottleneck < 1:
        raise ValueError(f"bottleneck (down_weight's rows) must be >= 1, got {bottleneck}")
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


def adapter_call(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    modulator: torch.Tensor,
    constraint: str,
    factor: float,
    activation: str,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, str]:
    """The dispatch point: check x and the residual, select the backend for ``backend``, run with
    ``scale = factor * gamma(modulator)``; return ``(out (..., D), name of the backend that ran)``.

    For callers whose other arguments passed :func:`check_adapter_params` (layers check them once).
    """
    check_input(x, down_weight, "down_weight")
    if residual is not None:
        check_residual(residual, x)
    chosen = select_backend(backend, x, FAMILY)
    compiling = torch.compiler.is_compiling()
    if not (compiling or (chosen == "torch" and dropout_p == 0.0 and not DOUBLE_BACKWARD_AHEAD[0])
            or transforms_active()):
        return _Adapter.apply(x, residual, down_weight, down_bias, up_weight, up_bias, modulator, constraint, factor,
                              activation, dropout_p, seed, chosen), chosen
    gamma = gamma_from_modulator(modulator, constraint)
    weights = (down_weight, down_bias, up_weight, up_bias)
    # the registered op under compile for kernels and host-seeded torch masks; the ATen composite otherwise
    opaque = compiling and not (chosen == "torch" and dropout_p == 0.0)
    if not opaque and dropout_p == 0.0:  # no op and no mask: the torch forward runs on (..., D) as it is
        return adapter_fwd_torch(x, residual, *weights, gamma, activation, dropout_p, seed, factor=factor)[0], chosen
    x2d = x.reshape(-1, x.shape[-1])
    residual2d = None if residual is None else residual.reshape(x2d.shape)
    if opaque:
        out = adapter_fwd(x2d, residual2d, *weights, gamma * factor, activation, dropout_p, seed, chosen)[0]
    else:
        out = adapter_fwd_torch(x2d, residual2d, *weights, gamma, activation, dropout_p, seed,
                                op_impl(chosen, FAMILY).dropout, factor)[0]
    return out.view(x.shape), chosen


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

    ``residual`` (..., D) or None (the residual is x: the sequential, Houlsby form). ``scale`` (1,) is usually
    ``gamma * alpha``. ``backend`` is "auto" (by device, overridden by ``METAPEFT_BACKEND``) or a backend name;
    an unavailable backend raises, it never falls back. Checks every argument (``scale`` must be finite) on each
    call; layers check their parameters once instead.
    """
    check_adapter_params(down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p)
    check_finite(scale, "scale")
    return adapter_call(x, residual, down_weight, down_bias, up_weight, up_bias, scale, "none", 1.0, activation,
                        float(dropout_p), device_seed(seed, dropout_p, x), backend)[0]
