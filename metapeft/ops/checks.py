"""Argument checks shared by the ops: each error names the argument it is about."""

from __future__ import annotations

import os

import torch
from torch.autograd import forward_ad


def check_floating(t: torch.Tensor, name: str) -> None:
    """``t`` must be a floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """``t`` must share ``ref``'s dtype and device."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def check_params(tensors: dict[str, tuple[torch.Tensor | None, int | None]], scale: torch.Tensor,
                 dropout_p: float) -> None:
    """The prelude of every op family's parameter checks. ``tensors`` maps each argument's name to ``(value,
    ndim)``, ``ndim`` None for an optional argument (None allowed, shape checked by the family); the first entry
    is a floating tensor that every other one matches in dtype and device; ``scale`` is a 1-D floating tensor on
    its device; ``dropout_p`` is in [0, 1)."""
    for name, (t, ndim) in (*tensors.items(), ("scale", (scale, 1))):
        if ndim is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    (first, (reference, _)), *others = tensors.items()
    check_floating(reference, first)
    for name, (t, _) in others:
        if t is not None:
            check_same(t, reference, name, first)
    check_floating(scale, "scale")
    if scale.device != reference.device:
        raise ValueError(f"scale must be on {first}'s device {reference.device}, got {scale.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def check_input(x: torch.Tensor, weight: torch.Tensor, weight_name: str) -> None:
    """The per-call checks of an op's input x (..., K) against its first weight (rows, K): a floating tensor of
    the weight's dtype and device whose last dimension is K. ``weight`` must have passed the op's parameter
    checks (a floating tensor): the common case then costs one compound test, the message is built on failure."""
    if not (isinstance(x, torch.Tensor) and x.dtype == weight.dtype and x.device == weight.device and x.ndim
            and x.shape[-1] == weight.shape[1]):
        _raise_input_error(x, weight, weight_name)


def _raise_input_error(x, weight: torch.Tensor, weight_name: str) -> None:
    check_floating(x, "x")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but {weight_name} is on {weight.device}; they must be on one device")
    if x.dtype != weight.dtype:
        raise TypeError(f"{weight_name} has dtype {weight.dtype} but x has dtype {x.dtype}; they must match")
    raise ValueError(f"x's last dimension ({x.shape[-1] if x.dim() else 'none'}) must equal {weight_name}'s "
                     f"in_features ({weight.shape[1]})")


def check_residual(residual: torch.Tensor, x: torch.Tensor) -> None:
    """The adapter's residual must be a tensor of x's shape, dtype and device (x passed :func:`check_input`)."""
    if not (isinstance(residual, torch.Tensor) and residual.dtype == x.dtype and residual.device == x.device
            and residual.shape == x.shape):
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a tensor or None, got {type(residual).__name__}")
        check_same(residual, x, "residual", "x")
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")


def transforms_active() -> bool:
    """True inside a ``torch.func`` transform (grad, vjp, jacrev, vmap, jvp) or a ``forward_ad.dual_level``."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def check_finite(t: torch.Tensor, name: str) -> None:
    """``t`` (a small parameter such as a modulator) must hold no NaN or inf.

    The check reads the values, so it runs only where that costs no device sync (CPU tensors) and
    never while compiling or inside a ``torch.func`` transform (where reading a value is data-dependent
    control flow); on CUDA set ``METAPEFT_CHECK_FINITE=1`` to enable it there too.
    """
    if torch.compiler.is_compiling() or transforms_active():
        return
    if t.device.type != "cpu" and os.environ.get("METAPEFT_CHECK_FINITE", "0") != "1":
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf: {t.detach().cpu().tolist()}")
