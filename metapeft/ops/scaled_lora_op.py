"""The scaled-LoRA op: its dispatch point, autograd, and registration (``metapeft::scaled_lora_fwd`` / ``_bwd``).

    y[:, seg j] = x W^T[:, seg j] + bias[seg j] + scale_j * (drop(x) A_j^T) B_j^T

Shapes and dtypes: x (M, K), weight (N, K), bias (N,) or None, lora_A (S*r, K), lora_B (N, r), all of
one floating dtype on one device; scale (S,) on the same device, any float dtype (a tensor with a
real gradient, never a Python float: changing it never recompiles and never syncs the host).
Segment j is the j-th equal slice of the N outputs (S = 3 for a fused qkv projection).

How a call runs (:func:`scaled_lora_call`, the only place that selects a backend):
- eager, torch backend without dropout (outside :func:`metapeft.ops.double_backward_ahead`): autograd through the
  one differentiable torch forward. Its backward
  runs in C++ autograd nodes (d scale from (N, r) tensors, the scale multiplying B; nothing of size M x N saved),
  ~20 us less host time per call than a Python backward at x (16, 16), r = 4.
- eager otherwise: a ``torch.autograd.Function`` that calls the backend's launchers directly and also computes
  the scale from a layer's modulator (no autograd node for either); with dropout it regenerates the mask in
  backward instead of keeping drop(x). (The registered custom op's
  Python wrapper costs more host time per call than the whole op at small shapes, and an autograd.Function with
  ``setup_context`` binds its arguments with ``inspect.signature`` on every call: ~40 us more than the
  ``forward(ctx, ...)`` form, measured at x (16, 16), r = 4 on CPU.)
- under ``torch.compile``: the registered custom op, whose fake kernels and autograd let the compiler trace it
  without graph breaks; the torch backend without dropout hands the compiler its ATen composite instead, which
  inductor fuses with the code around it.
- under forward-mode AD or a ``torch.func`` transform (``grad``, ``jacrev``, ``vmap``, ``jvp``): the one
  differentiable torch forward (:func:`metapeft.ops.scaled_lora_torch.scaled_lora_fwd_torch`) with the selected
  backend's dropout rule, so every transform composes with it (vmap included, over x or over the scale).

Meta-gradient readiness: first-order backward runs the selected backend's fused kernels. Double backward is
supported: when the backward runs with grad mode on (``create_graph=True``) it is computed from differentiable
ATen ops (:func:`metapeft.ops.scaled_lora_torch.scaled_lora_bwd_torch`), with ``h`` recomputed from x and A
under the forward backend's dropout mask.
"""

from __future__ import annotations

import torch

from metapeft.modulator import gamma_from_modulator, modulator_gradient, scale_from_modulator
from metapeft.ops.backends import DOUBLE_BACKWARD_AHEAD, OpImpl, op_impl, register_op, select_backend
from metapeft.ops.checks import check_finite, check_floating, check_input, check_same, transforms_active
from metapeft.ops.dropout import device_seed, seeded_dropout, torch_dropout_factors
from metapeft.ops.scaled_lora_torch import scaled_lora_bwd_torch, scaled_lora_fwd_torch

FAMILY = "scaled_lora"


def _grads(saved, grad_y, needs, dropout_p, seed, backend, kernel_backward):
    """``(dx, dweight, dbias, dA, dB, dscale)`` (None where not needed) from the saved tensors; differentiable
    when grad mode is on (double backward), else from ``kernel_backward`` (the backend's launcher or its op)."""
    x, weight, lora_A, lora_B, scale, h = saved
    if torch.is_grad_enabled():
        factors = op_impl(backend, FAMILY).dropout
        h = seeded_dropout(x, dropout_p, seed, factors) @ lora_A.t()
        return scaled_lora_bwd_torch(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, needs, factors)
    return kernel_backward(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, needs)


class _ScaledLoRA(torch.autograd.Function):
    """The eager path (see the module docstring): x (..., K) is flattened here, and the scale
    ``factor * gamma(modulator)`` is computed here, so that neither costs an autograd node per call."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, modulator, constraint, factor, dropout_p, seed, backend):
        impl = op_impl(backend, FAMILY)
        x2d = x.reshape(-1, x.shape[-1])
        scale = scale_from_modulator(modulator, constraint, factor)
        y, h = impl.forward(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
        ctx.save_for_backward(x, weight, lora_A, lora_B, modulator, scale, h)  # x itself: double backward needs it
        ctx.options = (constraint, factor, dropout_p, seed, backend, impl.backward)
        return y.view(*x.shape[:-1], y.shape[1])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, modulator, scale, h = ctx.saved_tensors
        constraint, factor, dropout_p, seed, backend, kernel_backward = ctx.options
        if torch.is_grad_enabled():  # double backward: the scale as a differentiable function of the modulator
            scale = scale_from_modulator(modulator, constraint, factor)
        x2d, grad_y2d = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
        dx, dweight, dbias, dA, dB, dscale = _grads((x2d, weight, lora_A, lora_B, scale, h), grad_y2d,
                                                    ctx.needs_input_grad[:6], dropout_p, seed, backend,
                                                    kernel_backward)
        dx = None if dx is None else dx.view(x.shape)
        dmodulator = None if dscale is None else modulator_gradient(dscale, modulator, constraint, factor)
        return dx, dweight, dbias, dA, dB, dmodulator, None, None, None, None, None


@torch.library.custom_op("metapeft::scaled_lora_fwd", mutates_args=())
def scaled_lora_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on 2-D x; returns ``(y (M, N), h (M, S*r))``. ``h`` is saved for backward, not a user output."""
    return op_impl(backend, FAMILY).forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


@scaled_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, backend):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


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
    seed: torch.Tensor | None,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward; returns ``(dx, dweight, dbias, dA, dB, dscale)``, an empty tensor where ``needs`` is False."""
    grads = op_impl(backend, FAMILY).backward(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed,
                                              tuple(needs))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@scaled_lora_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, backend, needs):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape, scale.shape)
    owners = (x, x, x, x, x, scale)
    return tuple(owner.new_empty(shape if need else (0,)) for owner, shape, need in zip(owners, shapes, needs))


def _op_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, scale, output[1])
    ctx.dropout_p, ctx.seed, ctx.backend = dropout_p, seed, backend
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, grad_y, _grad_h):
    def kernel_backward(*args):
        grads = scaled_lora_bwd(*args[:-1], ctx.backend, list(args[-1]))
        return tuple(g if need else None for g, need in zip(grads, args[-1]))

    grads = _grads(ctx.saved_tensors, grad_y, tuple(ctx.needs_input_grad[:6]), ctx.dropout_p, ctx.seed, ctx.backend,
                   kernel_backward)
    return (*grads, None, None, None)


scaled_lora_fwd.register_autograd(_op_backward, setup_context=_op_setup_context)
register_op("torch", FAMILY, OpImpl(scaled_lora_fwd_torch, scaled_lora_bwd_torch, torch_dropout_factors))


def check_scaled_lora_params(weight, bias, lora_A, lora_B, scale, dropout_p) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the first bad argument of :func:`scaled_lora` other than x.

    Layers run it when they are built and when their parameters change, not per call.
    """
    for name, t, ndim in (("weight", weight, 2), ("lora_A", lora_A, 2), ("lora_B", lora_B, 2), ("scale", scale, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    check_floating(weight, "weight")
    for name, t in (("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None:
            check_same(t, weight, name, "weight")
    check_floating(scale, "scale")
    if scale.device != weight.device:
        raise ValueError(f"scale must be on weight's device {weight.device}, got {scale.device}")
    out_features, in_features = weight.shape
    segments, rank = scale.shape[0], lora_B.shape[1]
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


def scaled_lora_call(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    modulator: torch.Tensor,
    constraint: str,
    factor: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, str]:
    """The dispatch point: check x, select the backend for ``backend`` ("auto" or a name), run with
    ``scale = factor * gamma(modulator)`` (``gamma`` per :func:`metapeft.modulator.gamma_from_modulator`);
    return ``(y (..., N), name of the backend that ran)``.

    For callers whose other arguments passed :func:`check_scaled_lora_params` (layers check them once); the
    per-call checks cover x only.
    """
    check_input(x, weight, "weight")
    chosen = select_backend(backend, x, FAMILY)
    compiling = torch.compiler.is_compiling()
    if not (compiling or (chosen == "torch" and dropout_p == 0.0 and not DOUBLE_BACKWARD_AHEAD[0])
            or transforms_active()):
        return _ScaledLoRA.apply(x, weight, bias, lora_A, lora_B, modulator, constraint, factor, dropout_p, seed,
                                 chosen), chosen
    gamma = gamma_from_modulator(modulator, constraint)
    x2d = x.reshape(-1, x.shape[-1])
    if compiling and not (chosen == "torch" and dropout_p == 0.0):  # kernels, or a torch mask from a host seed
        y = scaled_lora_fwd(x2d, weight, bias, lora_A, lora_B, gamma * factor, dropout_p, seed, chosen)[0]
    else:
        y = scaled_lora_fwd_torch(x2d, weight, bias, lora_A, lora_B, gamma, dropout_p, seed,
                                  op_impl(chosen, FAMILY).dropout, factor)[0]
    return y.view(*x.shape[:-1], weight.shape[0]), chosen


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

    ``scale`` (S,) is usually ``gamma * alpha / r``. ``backend`` is "auto" (by device, overridden by
    ``METAPEFT_BACKEND``) or a backend name; an unavailable backend raises, it never falls back. ``seed``: an int or
    an int64 scalar tensor (see :mod:`metapeft.ops.dropout`). Checks every argument (``scale`` must be finite) on
    each call; layers check their parameters once instead.
    """
    check_scaled_lora_params(weight, bias, lora_A, lora_B, scale, dropout_p)
    check_finite(scale, "scale")
    return scaled_lora_call(x, weight, bias, lora_A, lora_B, scale, "none", 1.0, float(dropout_p),
                            device_seed(seed, dropout_p, x), backend)[0]
