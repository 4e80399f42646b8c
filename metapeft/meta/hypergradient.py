"""The hypergradient of MetaPEFT's bi-level problem: d L_val(phi'(rho), rho) / d rho through one look-ahead step.

phi: every trainable parameter that is not a modulator (PEFT weights and the head; :func:`trainable_phi`).
rho: the modulators (``metapeft.meta_parameters``). With SGD learning rate ``lr``, momentum ``mu`` with
buffers ``m`` (torch.optim.SGD's ``momentum_buffer`` from before the step; 0 when absent) and weight decay
``wd``, the look-ahead is exactly the step torch's SGD takes:

    phi' = phi - lr * (g + wd * phi + mu * m),        g = grad_phi L_train(phi, rho)

Only g depends on rho, so with v = grad_phi' L_val(phi', rho):

    d L_val / d rho = grad_rho L_val(phi', rho)  -  lr * (d^2 L_train / d rho d phi)(phi, rho) . v
                      '------ direct term -----'    '------------- second-order term -------------'

Modes:

- ``"exact"``: the second-order term as ONE Hessian-vector product, reverse over reverse: the train
  backward runs with ``create_graph=True`` (metapeft's fused ops then take their differentiable composite
  backward; attention runs on the math path, :func:`metapeft.meta.math_attention`), and
  ``autograd.grad(g, rho, grad_outputs=v)`` differentiates ``g . v`` with respect to rho only.
- ``"finite_difference"``: DARTS' central difference
  ``(grad_rho L_train(phi + eps v, rho) - grad_rho L_train(phi - eps v, rho)) / (2 eps)`` with
  ``eps = fd_epsilon`` or, by default, ``0.01 / ||v||`` (a parameter-space step of norm 0.01, DARTS'
  choice; the error is O(eps^2)). The two extra passes differentiate with respect to rho only, with phi
  frozen, so every fused backward skips its dA / dB (and head) GEMMs. They replay the train pass's random
  numbers (dropout masks), so the difference is taken on the same stochastic loss.
- ``"first_order"``: the direct term only (what the authors' code computes); its val pass needs d rho only.

Nothing is written to ``.grad`` (everything is ``torch.autograd.grad``) and the model's parameters are left
exactly as they were: the passes at phi' and phi +- eps v swap in new tensors and put the original
``Parameter`` objects back. Random-number state after the call is as after one train and one val forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metapeft.meta.attention import math_attention
from metapeft.params import meta_parameters

MODES = ("exact", "finite_difference", "first_order")
FD_RADIUS = 0.01


@dataclass
class HypergradientResult:
    """What one meta step computes.

    Attributes:
        meta_grads: d L_val(phi') / d rho, one tensor per modulator, in ``meta_parameters(model)`` order
            (each of the modulator's shape, e.g. (S,)).
        lookahead: phi' = phi - lr * (g + wd * phi + mu * m), detached, in :func:`trainable_phi` order.
        phi_grads: g = grad_phi L_train(phi, rho), detached, in :func:`trainable_phi` order (zeros for a
            parameter the train loss does not reach); feed it to the inner optimizer to take the step.
        train_loss: L_train(phi, rho), detached 0-d tensor.
        val_loss: L_val(phi', rho), detached 0-d tensor.
    """

    meta_grads: list[torch.Tensor]
    lookahead: list[torch.Tensor]
    phi_grads: list[torch.Tensor]
    train_loss: torch.Tensor
    val_loss: torch.Tensor


def trainable_phi(model: nn.Module) -> list[nn.Parameter]:
    """phi: every parameter of ``model`` with ``requires_grad`` that is not a learnable modulator, in
    ``model.parameters()`` order (PEFT weights and the head after ``mark_only_peft_trainable``)."""
    modulators = {id(p) for p in meta_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in modulators]


@contextlib.contextmanager
def _parameters_replaced(model: nn.Module, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor],
                         requires_grad: bool) -> Iterator[list[nn.Parameter]]:
    """Inside the block ``model`` sees fresh leaves holding ``values`` in place of ``params`` (every
    occurrence, shared parameters included); yields the leaves. The original objects are put back on exit."""
    leaves = [nn.Parameter(v.detach(), requires_grad=requires_grad) for v in values]
    index = {id(p): i for i, p in enumerate(params)}
    slots = [(module, name, index[id(p)]) for module in model.modules()
             for name, p in module._parameters.items() if p is not None and id(p) in index]
    for module, name, i in slots:
        module._parameters[name] = leaves[i]
    try:
        yield leaves
    finally:
        for module, name, i in slots:
            module._parameters[name] = params[i]


class _RngReplay:
    """Records the CPU and CUDA random-number states so a forward pass can be replayed with the same
    random numbers (dropout masks), and restores the state that followed the recorded passes."""

    def __init__(self, devices: set[torch.device]) -> None:
        self.cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                            for d in devices if d.type == "cuda"})
        self.start = self._get()
        self.end: tuple | None = None

    def _get(self) -> tuple:
        return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in self.cuda]

    def _set(self, state: tuple) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        for i, s in zip(self.cuda, cuda):
            torch.cuda.set_rng_state(s, i)

    def mark_end(self) -> None:
        self.end = self._get()

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        self._set(self.start)
        try:
            yield
        finally:
            self._set(self.end)


def _loss(loss_fn: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module, batch: Any, which: str) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise ValueError(f"loss_fn(model, {which}_batch) must return a floating scalar tensor, got "
                         f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not loss.requires_grad:
        raise ValueError(f"loss_fn(model, {which}_batch) does not depend on any trainable parameter")
    return loss.reshape(())


def _grads(outputs, inputs, **kwargs) -> list[torch.Tensor]:
    """``torch.autograd.grad`` with zeros for inputs the outputs do not reach."""
    grads = torch.autograd.grad(outputs, inputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)]


def _check_hyperparameters(lr, momentum, weight_decay, mode, fd_epsilon) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
            raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    if fd_epsilon is not None and (not isinstance(fd_epsilon, (int, float)) or not fd_epsilon > 0.0):
        raise ValueError(f"fd_epsilon must be a float > 0 or None, got {fd_epsilon!r}")
    if fd_epsilon is not None and mode != "finite_difference":
        raise ValueError(f"fd_epsilon is only used by mode='finite_difference', got mode={mode!r}")


def _check_momentum_buffers(buffers, phi: list[nn.Parameter]) -> list[torch.Tensor | None]:
    if buffers is None:
        return [None] * len(phi)
    buffers = list(buffers)
    if len(buffers) != len(phi):
        raise ValueError(f"momentum_buffers must have one entry (or None) per trainable_phi(model) parameter "
                         f"({len(phi)}), got {len(buffers)}")
    for i, (m, p) in enumerate(zip(buffers, phi)):
        if m is not None and (not isinstance(m, torch.Tensor) or m.shape != p.shape or m.device != p.device):
            raise ValueError(f"momentum_buffers[{i}] must be None or a tensor of shape {tuple(p.shape)} on {p.device}, "
                             f"got {type(m).__name__}{tuple(m.shape) if isinstance(m, torch.Tensor) else ''}")
    return buffers


def hypergradient(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    train_batch: Any,
    val_batch: Any,
    *,
    lr: float,
    momentum: float = 0.0,
    momentum_buffers: Sequence[torch.Tensor | None] | None = None,
    weight_decay: float = 0.0,
    mode: str = "exact",
    fd_epsilon: float | None = None,
) -> HypergradientResult:
    """One meta step: d L_val(phi') / d rho through one SGD look-ahead (see the module docstring for the math).

    Args:
        model: a model with metapeft modules; phi = :func:`trainable_phi`, rho = ``meta_parameters(model)``.
        loss_fn: ``loss_fn(model, batch) -> 0-d loss``, called on ``train_batch`` and ``val_batch``.
        lr, momentum, weight_decay: the inner SGD step's hyperparameters (dampening 0, no Nesterov).
        momentum_buffers: per phi parameter (``trainable_phi`` order), SGD's momentum buffer from before the
            step or None; ``None`` for the whole list means no momentum term.
        mode: ``"exact"``, ``"finite_difference"`` or ``"first_order"``.
        fd_epsilon: the finite-difference step along v (phi +- eps * v); default ``0.01 / ||v||``.

    Returns a :class:`HypergradientResult`; the model's parameters and their ``.grad`` are untouched.
    """
    _check_hyperparameters(lr, momentum, weight_decay, mode, fd_epsilon)
    phi, rho = trainable_phi(model), meta_parameters(model)
    if not rho:
        raise ValueError("model has no learnable modulators: meta_parameters(model) is empty")
    if not phi:
        raise ValueError("model has no trainable parameters besides its modulators: trainable_phi(model) is empty")
    buffers = _check_momentum_buffers(momentum_buffers, phi)
    exact = mode == "exact"
    rng = _RngReplay({p.device for p in phi}) if mode == "finite_difference" else None

    with math_attention(model) if exact else contextlib.nullcontext():
        train_loss = _loss(loss_fn, model, train_batch, "train")
    grads = _grads(train_loss, phi, create_graph=exact)
    with torch.no_grad():
        lookahead = [p - lr * (g + weight_decay * p + (0.0 if m is None else momentum * m))
                     for p, g, m in zip(phi, grads, buffers)]

    with _parameters_replaced(model, phi, lookahead, requires_grad=mode != "first_order") as leaves:
        val_loss = _loss(loss_fn, model, val_batch, "val")
        val_grads = _grads(val_loss, rho + (leaves if mode != "first_order" else []))
    if rng is not None:
        rng.mark_end()
    direct, v = val_grads[: len(rho)], val_grads[len(rho):]

    if mode == "first_order":
        meta_grads = direct
    else:
        if exact:
            pairs = [(g, w) for g, w in zip(grads, v) if g.requires_grad]
            second = _grads([g for g, _ in pairs], rho, grad_outputs=[w for _, w in pairs])
        else:
            second = _finite_difference(model, loss_fn, train_batch, phi, rho, v, fd_epsilon, rng)
        meta_grads = [d - lr * s for d, s in zip(direct, second)]
    return HypergradientResult(
        meta_grads=[g.detach() for g in meta_grads],
        lookahead=lookahead,
        phi_grads=[g.detach() for g in grads],
        train_loss=train_loss.detach(),
        val_loss=val_loss.detach(),
    )


def _finite_difference(model, loss_fn, train_batch, phi, rho, v, fd_epsilon, rng) -> list[torch.Tensor]:
    """(grad_rho L_train(phi + eps v) - grad_rho L_train(phi - eps v)) / (2 eps), phi frozen in both passes."""
    if fd_epsilon is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.float()) for w in v]))
        # v = 0 makes the term exactly 0 with any finite eps; clamping keeps eps finite (no host sync to check)
        eps = FD_RADIUS / norm.clamp_min(torch.finfo(torch.float32).tiny)
    else:
        eps = torch.tensor(float(fd_epsilon), device=v[0].device)
    rho_grads = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            shifted = [p + (sign * eps).to(p.dtype) * w for p, w in zip(phi, v)]
        with rng.replay(), _parameters_replaced(model, phi, shifted, requires_grad=False):
            rho_grads.append(_grads(_loss(loss_fn, model, train_batch, "train"), rho))
    return [(plus - minus) / (2 * eps).to(plus.dtype) for plus, minus in zip(*rho_grads)]
