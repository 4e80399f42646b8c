"""The hypergradient of MetaPEFT's bi-level problem: d L_val(phi_K(rho), rho) / d rho through K look-ahead steps.

phi: every trainable parameter that is not a modulator (PEFT weights and the head; :func:`trainable_phi`).
rho: the modulators (``metapeft.meta_parameters``). With SGD learning rate ``lr``, momentum ``mu`` with
buffers ``m_0`` (torch.optim.SGD's ``momentum_buffer`` from before the step; 0 when absent) and weight decay
``wd``, the look-ahead takes K >= 1 steps exactly as torch's SGD takes them, step k on train batch B_k:

    u_k = g_k + wd * phi_k + mu * m_k,    phi_{k+1} = phi_k - lr * u_k,    m_{k+1} = u_k,
    g_k = grad_phi L_train(phi_k, rho; B_k)

(B_0 = ``train_batch``, B_1..B_{K-1} = ``lookahead_batches``; one ``lr`` for all K steps). Only the g_k depend
on rho. Reverse mode through the K steps, with v = grad_phi L_val(phi_K, rho) and c_{K-1} = v:

    d L_val / d rho = grad_rho L_val(phi_K, rho)  -  lr * sum_k R_k c_k        (direct term, second-order term)
    a_K = v,   a_k = a_{k+1} - lr * (H_k c_k + wd * c_k),   c_{k-1} = a_k + mu * c_k

with R_k = d^2 L_train(B_k) / d rho d phi and H_k = d^2 L_train(B_k) / d phi^2 at (phi_k, rho). For K = 1 this is
``direct - lr * R_0 v``; K > 1 adds one Hessian-vector product H_k c_k per step k >= 1.

Module-wise learning rates (``lr_scales``, the modulator as a learning rate): each phi tensor may carry a
multiplier D(rho) (elementwise, e.g. gamma of the module it belongs to), so that ``phi_{k+1} = phi_k - lr * D * u_k``.
Then ``c_{K-1} = D v`` and ``c_{k-1} = D a_k + mu * c_k`` in the recursion above, and the hypergradient gains
the learning-rate term ``-lr * sum_k (dD/drho)^T (u_k * a_{k+1})`` (one reverse pass through D; no second
derivative of the loss). In ``first_order`` mode the recursion runs with R_k = H_k = 0, so the learning-rate term
is kept: it is what makes the modulator a learning rate even without second derivatives.

Modes:

- ``"exact"``: every R_k c_k (and H_k c_k) as ONE reverse-over-reverse product: the train backward of step k
  runs with ``create_graph=True`` (metapeft's fused ops, told by :func:`metapeft.ops.double_backward_ahead`,
  record their ``autograd.Function``, whose backward is then differentiable; attention runs on the math path,
  :func:`metapeft.meta.math_attention`), and ``autograd.grad(g_k, (rho, phi_k),
  grad_outputs=c_k)`` differentiates ``g_k . c_k``. The K train graphs stay alive until their product is
  taken, so the memory grows linearly in K, by one double-differentiable train graph per step (peak 489, 773,
  1104, 1369 MiB at K = 1..4 for ViT-Ti at 64 px, batch 32; ``benchmarks/bench_lookahead_memory.py``).
- ``"finite_difference"``: DARTS' central difference ``(grad L_train(phi_k + eps c_k) - grad L_train(phi_k -
  eps c_k)) / (2 eps)`` with ``eps = fd_epsilon`` or, by default, ``0.01 / ||c_k||`` (a parameter-space step of
  norm 0.01, DARTS' choice; the error is O(eps^2)). At k = 0 the two passes differentiate with respect to rho
  only, phi frozen, so every fused backward skips its dA / dB (and head) GEMMs; for k >= 1 they also give H_k c_k.
  They replay step k's random numbers (dropout masks), so the difference is taken on the same stochastic loss.
- ``"first_order"``: the direct term only (what the authors' code computes); its val pass needs d rho only
  (and v too when ``lr_scales`` are given, for the learning-rate term).

Sharded across ranks (``reduce``: a process group or a reduction callable, :mod:`metapeft.meta.distributed`):
every batch argument is the calling rank's shard of the global batch, every loss a mean over its shard, and
each pass runs on the shards only, weighted by shard size (the global mean over uneven shards): one
all-reduce of the shard sizes; per look-ahead step one of (g_k, L_train) -- the global step; one of
(direct term, v, L_val) from the val shards; per step k >= 1 one of H_k c_k; one of sum_k R_k c_k at the end.
The finite-difference eps uses the global ||c_k||. Every rank returns the same, global result. A shard may
be empty (it then contributes zeros and runs no pass); a shard's size is the length of the first dimension
of the first tensor found in the batch (depth-first through tuples, lists and dict values).

Nothing is written to ``.grad`` (everything is ``torch.autograd.grad``) and the model's parameters are left
exactly as they were: the passes at phi_k and phi_k +- eps c_k swap in new tensors and put the original
``Parameter`` objects back. Random-number state after the call is as after the K train and one val forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from metapeft.meta.attention import math_attention
from metapeft.meta.distributed import Reduction, as_reduction
from metapeft.ops import double_backward_ahead
from metapeft.params import meta_parameters

MODES = ("exact", "finite_difference", "first_order")
FD_RADIUS = 0.01


@dataclass
class HypergradientResult:
    """What one meta step computes.

    Attributes:
        meta_grads: d L_val(phi_K) / d rho, one tensor per modulator, in ``meta_parameters(model)`` order
            (each of the modulator's shape, e.g. (S,)).
        lookahead: phi_K, the parameters after the K look-ahead steps, detached, in :func:`trainable_phi` order.
        phi_grads: g_0 = grad_phi L_train(phi, rho; train_batch) (the global mean when sharded), detached, in
            :func:`trainable_phi` order (zeros for a parameter the train loss does not reach); feed it to the
            inner optimizer to take the real step.
        train_loss: L_train(phi, rho; train_batch), detached 0-d tensor.
        val_loss: L_val(phi_K, rho), detached 0-d tensor.
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
    """Records the CPU and CUDA random-number states before each look-ahead step's train pass, so that pass
    can be replayed with the same random numbers (dropout masks), and restores the state that followed the
    recorded passes."""

    def __init__(self, devices: set[torch.device]) -> None:
        self.cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                            for d in devices if d.type == "cuda"})
        self.marks: list[tuple] = []
        self.end: tuple | None = None

    def _get(self) -> tuple:
        return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in self.cuda]

    def _set(self, state: tuple) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        for i, s in zip(self.cuda, cuda):
            torch.cuda.set_rng_state(s, i)

    def mark_step(self) -> None:
        self.marks.append(self._get())

    def mark_end(self) -> None:
        self.end = self._get()

    @contextlib.contextmanager
    def replay(self, step: int) -> Iterator[None]:
        self._set(self.marks[step])
        try:
            yield
        finally:
            self._set(self.end)


def _loss(loss_fn: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module, batch: Any, which: str) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise ValueError(f"loss_fn(model, {which}) must return a floating scalar tensor, got "
                         f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not loss.requires_grad:
        raise ValueError(f"loss_fn(model, {which}) does not depend on any trainable parameter")
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


def _check_lr_scales(scales, phi: list[nn.Parameter]) -> list[torch.Tensor | None] | None:
    if scales is None:
        return None
    scales = list(scales)
    if len(scales) != len(phi):
        raise ValueError(f"lr_scales must have one entry (or None) per trainable_phi(model) parameter ({len(phi)}), "
                         f"got {len(scales)}")
    for i, (d, p) in enumerate(zip(scales, phi)):
        if d is None:
            continue
        if not isinstance(d, torch.Tensor) or d.device != p.device:
            raise ValueError(f"lr_scales[{i}] must be None or a tensor on {p.device}, got {type(d).__name__}")
        try:
            torch.broadcast_shapes(d.shape, p.shape)
        except RuntimeError:
            raise ValueError(f"lr_scales[{i}] of shape {tuple(d.shape)} does not broadcast to the parameter's "
                             f"{tuple(p.shape)}") from None
    return scales


def _sample_count(batch: Any) -> int | None:
    """Length of dim 0 of the first tensor in ``batch`` (depth-first through tuples, lists, dict values)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        count = _sample_count(item)
        if count is not None:
            return count
    return None


def _shard_weights(batches: dict[str, Any], reduce: Reduction, device: torch.device) -> list[float]:
    """Per batch, this rank's share of the global batch (local size / sum of the sizes over ranks)."""
    local = []
    for name, batch in batches.items():
        count = _sample_count(batch)
        if count is None:
            raise ValueError(f"{name} holds no tensor with a batch dimension: its shard size is unknown")
        local.append(count)
    (total,) = reduce([torch.tensor(local, dtype=torch.int64, device=device)])
    weights = []
    for name, n, n_total in zip(batches, local, total.tolist()):
        if n_total == 0:
            raise ValueError(f"{name} is empty on every rank")
        weights.append(n / n_total)
    return weights


def _sum(reduce: Reduction | None, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors if reduce is None else reduce(tensors)


class _Step:
    """One look-ahead step's record: phi_k (values), the tensors its gradient was taken with respect to, its
    shard's weight and batch, and (exact mode) the rank-local gradient with its double-differentiable graph."""

    def __init__(self, values: list[torch.Tensor], batch: Any, weight: float | None, name: str) -> None:
        self.values, self.batch, self.weight, self.name = values, batch, weight, name
        self.updates: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.local_grads: list[torch.Tensor] = []

    @property
    def empty(self) -> bool:
        return self.weight == 0.0

    def weighted_loss(self, loss_fn, model: nn.Module) -> torch.Tensor:
        loss = _loss(loss_fn, model, self.batch, self.name)
        return loss if self.weight is None else loss * self.weight


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
    lookahead_batches: Sequence[Any] = (),
    reduce: dist.ProcessGroup | Reduction | None = None,
    lr_scales: Sequence[torch.Tensor | None] | None = None,
) -> HypergradientResult:
    """One meta step: d L_val(phi_K) / d rho through K SGD look-ahead steps (see the module docstring for the math).

    Args:
        model: a model with metapeft modules; phi = :func:`trainable_phi`, rho = ``meta_parameters(model)``.
        loss_fn: ``loss_fn(model, batch) -> 0-d loss`` (a mean over the batch), called on the train and val batches.
        train_batch: the batch of look-ahead step 1 (its gradient is ``phi_grads``).
        val_batch: the meta (validation) batch, evaluated at phi_K.
        lr, momentum, weight_decay: the inner SGD step's hyperparameters (dampening 0, no Nesterov).
        momentum_buffers: per phi parameter (``trainable_phi`` order), SGD's momentum buffer from before the
            step or None; ``None`` for the whole list means no momentum term.
        mode: ``"exact"``, ``"finite_difference"`` or ``"first_order"``.
        fd_epsilon: the finite-difference step along c_k (phi_k +- eps * c_k); default ``0.01 / ||c_k||``.
        lookahead_batches: the train batches of look-ahead steps 2..K, so ``lookahead_steps`` K =
            1 + len(lookahead_batches); empty (K = 1) by default.
        reduce: None for a single process; otherwise a ``torch.distributed`` process group, or a callable
            summing a list of tensors over the ranks (:mod:`metapeft.meta.distributed`). Every batch is then
            this rank's shard and every rank must make the same call (same K, same model).
        lr_scales: per phi parameter (``trainable_phi`` order), a learning-rate multiplier D broadcastable to it
            and differentiable in rho (e.g. :func:`metapeft.params.module_lr_scales`), or None (1); the look-ahead
            steps are ``phi - lr * D * u`` (module docstring). None for the whole list: plain SGD.

    Returns a :class:`HypergradientResult` (global over the ranks); the model's parameters and their ``.grad``
    are untouched.
    """
    _check_hyperparameters(lr, momentum, weight_decay, mode, fd_epsilon)
    if not isinstance(lookahead_batches, (list, tuple)):
        raise ValueError(f"lookahead_batches must be a list or tuple of batches (steps 2..K), got "
                         f"{type(lookahead_batches).__name__}")
    reduce = as_reduction(reduce)
    phi, rho = trainable_phi(model), meta_parameters(model)
    if not rho:
        raise ValueError("model has no learnable modulators: meta_parameters(model) is empty")
    if not phi:
        raise ValueError("model has no trainable parameters besides its modulators: trainable_phi(model) is empty")
    buffers = _check_momentum_buffers(momentum_buffers, phi)
    scales = _check_lr_scales(lr_scales, phi)
    names = ["train_batch", *(f"lookahead_batches[{i}]" for i in range(len(lookahead_batches))), "val_batch"]
    batches = dict(zip(names, [train_batch, *lookahead_batches, val_batch]))
    weights = [None] * len(batches) if reduce is None else _shard_weights(batches, reduce, phi[0].device)
    rng = _RngReplay({p.device for p in phi}) if mode == "finite_difference" else None

    steps, values = [], list(phi)
    for name, batch, weight in zip(names[:-1], list(batches.values())[:-1], weights[:-1]):
        step = _Step(values, batch, weight, name)
        if rng is not None:
            rng.mark_step()
        grads, loss = _step_gradient(model, loss_fn, step, phi, reduce, at_phi=not steps,
                                     create_graph=mode == "exact")
        if not steps:
            phi_grads, train_loss = grads, loss
        with torch.no_grad():
            updates = [g + weight_decay * p + (0.0 if m is None else momentum * m)
                       for p, g, m in zip(values, grads, buffers)]
            values = [p - lr * u for p, u in zip(values, _scaled(scales, updates))]
        buffers = step.updates = updates
        steps.append(step)

    with_v = mode != "first_order" or scales is not None
    direct, v, val_loss = _val_pass(model, loss_fn, val_batch, weights[-1], phi, rho, values, with_v, reduce)
    if rng is not None:
        rng.mark_end()
    if not with_v:
        meta_grads = direct
    else:
        second, lr_term = _second_order(model, loss_fn, steps, phi, rho, v, lr, momentum, weight_decay, mode,
                                        fd_epsilon, rng, reduce, scales)
        meta_grads = [d - lr * s for d, s in zip(direct, second)]
        if lr_term is not None and lr_term.requires_grad:
            meta_grads = [g - lr * t for g, t in zip(meta_grads, _grads(lr_term, rho))]
    return HypergradientResult(
        meta_grads=[g.detach() for g in meta_grads],
        lookahead=values,
        phi_grads=phi_grads,
        train_loss=train_loss,
        val_loss=val_loss,
    )


def _step_gradient(model, loss_fn, step: _Step, phi, reduce, at_phi: bool, create_graph: bool):
    """g_k and L_train of look-ahead step ``step`` (global when sharded), detached; keeps the rank-local
    gradient (with its graph when ``create_graph``) and its inputs on ``step``. ``at_phi``: step 0, whose
    gradient is taken with respect to the model's own parameters."""
    if step.empty:
        local = [torch.zeros_like(p) for p in phi]
        loss = torch.zeros((), dtype=phi[0].dtype, device=phi[0].device)
    else:
        swapped = contextlib.nullcontext(phi) if at_phi else _parameters_replaced(model, phi, step.values, True)
        double_backward = contextlib.ExitStack()
        if create_graph:
            double_backward.enter_context(math_attention(model))
            double_backward.enter_context(double_backward_ahead())
        with swapped as inputs, double_backward:
            loss = step.weighted_loss(loss_fn, model)
        local = _grads(loss, inputs, create_graph=create_graph)
        step.inputs = inputs
        loss = loss.detach()
    if create_graph:
        step.local_grads = local
    *grads, loss = _sum(reduce, [g.detach() for g in local] + [loss.reshape(1)])
    return grads, loss.reshape(())


def _val_pass(model, loss_fn, val_batch, weight, phi, rho, values, with_v: bool, reduce):
    """(direct term, v, L_val) at phi_K from this rank's val shard, summed over ranks; v is [] unless ``with_v``."""
    with _parameters_replaced(model, phi, values, requires_grad=with_v) as leaves:
        inputs = rho + (leaves if with_v else [])
        if weight == 0.0:
            local = [torch.zeros_like(p) for p in inputs]
            loss = torch.zeros((), dtype=phi[0].dtype, device=phi[0].device)
        else:
            loss = _loss(loss_fn, model, val_batch, "val_batch")
            loss = loss if weight is None else loss * weight
            local = _grads(loss, inputs)
            loss = loss.detach()
    *grads, loss = _sum(reduce, local + [loss.reshape(1)])
    return grads[: len(rho)], grads[len(rho):], loss.reshape(())


def _scaled(scales, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """D * t per phi tensor (t itself where D is None or no scales are given)."""
    if scales is None:
        return tensors
    return [t if d is None else d.detach() * t for d, t in zip(scales, tensors)]


def _second_order(model, loss_fn, steps: list[_Step], phi, rho, v, lr, momentum, weight_decay, mode, fd_epsilon,
                  rng, reduce, scales) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(sum_k R_k c_k summed over ranks, and with ``scales`` the scalar sum_k <D, u_k * a_{k+1}> whose gradient in rho
    is the learning-rate term, else None) by the reverse recursion of the module docstring; ``first_order`` mode
    runs it with R_k = H_k = 0."""
    adjoint, c = v, _scaled(scales, v)
    rho_term = [torch.zeros_like(p) for p in rho]
    lr_term = None
    for k in range(len(steps) - 1, -1, -1):
        step = steps[k]
        with_phi = k > 0
        if scales is not None:
            pairs = [(d * (u * a).detach()).sum() for d, u, a in zip(scales, step.updates, adjoint) if d is not None]
            lr_term = sum(pairs) if lr_term is None else lr_term + sum(pairs)
        if mode == "first_order":
            products = [torch.zeros_like(p) for p in rho] + ([torch.zeros_like(w) for w in c] if with_phi else [])
        elif mode == "exact":
            products = _exact_products(step, rho, c, with_phi)
        else:
            products = _finite_difference_products(model, loss_fn, step, k, phi, rho, c, with_phi, fd_epsilon, rng)
        rho_term = [t + r for t, r in zip(rho_term, products[: len(rho)])]
        if with_phi:
            hessian_c = _sum(reduce, products[len(rho):]) if mode != "first_order" else products[len(rho):]
            with torch.no_grad():
                adjoint = [a - lr * (h + weight_decay * w) for a, h, w in zip(adjoint, hessian_c, c)]
                c = [a + momentum * w for a, w in zip(_scaled(scales, adjoint), c)]
    return _sum(reduce, rho_term), lr_term


def _exact_products(step: _Step, rho, c, with_phi: bool) -> list[torch.Tensor]:
    """(R_k c, and H_k c when ``with_phi``) of this rank's shard: one reverse pass over g_k's graph."""
    inputs = rho + (step.inputs if with_phi else [])
    pairs = [(g, w) for g, w in zip(step.local_grads, c) if g.requires_grad]
    step.local_grads = []
    if not pairs:
        return [torch.zeros_like(p) for p in rho] + ([torch.zeros_like(w) for w in c] if with_phi else [])
    return _grads([g for g, _ in pairs], inputs, grad_outputs=[w for _, w in pairs])


def _finite_difference_products(model, loss_fn, step: _Step, k: int, phi, rho, c, with_phi: bool, fd_epsilon,
                                rng) -> list[torch.Tensor]:
    """(grad L_train(phi_k + eps c) - grad L_train(phi_k - eps c)) / (2 eps) with respect to rho (and phi_k when
    ``with_phi``; otherwise phi is frozen in both passes), on this rank's shard with step k's random numbers."""
    if step.empty:
        return [torch.zeros_like(p) for p in rho] + ([torch.zeros_like(w) for w in c] if with_phi else [])
    if fd_epsilon is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.float()) for w in c]))
        # c = 0 makes the term exactly 0 with any finite eps; clamping keeps eps finite (no host sync to check)
        eps = FD_RADIUS / norm.clamp_min(torch.finfo(torch.float32).tiny)
    else:
        eps = torch.tensor(float(fd_epsilon), device=c[0].device)
    passes = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            shifted = [p + (sign * eps).to(p.dtype) * w for p, w in zip(step.values, c)]
        with rng.replay(k), _parameters_replaced(model, phi, shifted, requires_grad=with_phi) as leaves:
            passes.append(_grads(step.weighted_loss(loss_fn, model), rho + (leaves if with_phi else [])))
    return [(plus - minus) / (2 * eps).to(plus.dtype) for plus, minus in zip(*passes)]
