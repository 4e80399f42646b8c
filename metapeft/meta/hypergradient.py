"""The hypergradient of MetaPEFT's bi-level problem: d L_val(phi_K(rho), rho) / d rho through K look-ahead steps.

phi: every trainable parameter that is not a modulator (PEFT weights and the head;
:func:`metapeft.params.trainable_phi`, not :func:`metapeft.params.peft_parameters`, the PEFT weights only).
rho: the modulators (``metapeft.meta_parameters``). With SGD learning rate ``lr``, momentum ``mu`` with
buffers ``m_0`` (torch.optim.SGD's ``momentum_buffer`` from before the step; 0 when absent) and weight decay
``wd``, the look-ahead takes K >= 1 steps exactly as torch's SGD takes them (:class:`metapeft.meta.inner.SGDRule`, the
rule the trainer's real step takes too), step k on train batch B_k:

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

AdamW instead of SGD (``inner_rule=AdamWRule(...)``, ``inner_state``: exp_avg, exp_avg_sq and step per phi tensor,
e.g. the Trainer's optimizer state): the K steps are torch's AdamW steps and the recursion above is replaced by
AdamW's adjoint (:class:`metapeft.meta.inner.AdamWRule`: the update is not linear in g_k, so c_{k-1} also reads step
k-1's moments and gradient); the second-order term keeps its form ``-lr * sum_k R_k c_k``, with
c_k = -(1/lr) dL_val/dg_k, and every mode works unchanged.

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

An FSDP2 model (``torch.distributed.fsdp.fully_shard`` on its blocks and root) runs the same sharded meta step over
its full parameters, all-gathered once per call (:mod:`metapeft.meta.fsdp`: why, and what it costs in memory);
``reduce`` then defaults to every rank of the FSDP mesh, and ``meta_grads``, ``lookahead`` and ``phi_grads`` come back
as ``DTensor`` laid out like the sharded parameters.

Where it lives: this module has the public function and the dispatch; :mod:`metapeft.meta.inner` the inner
rule (its update and its adjoint, shared with the trainer's real step), :mod:`metapeft.meta.lookahead` the forward
look-ahead and the reverse recursion every mode shares, and one module per mode (:mod:`metapeft.meta.exact`,
:mod:`metapeft.meta.finite_difference`, :mod:`metapeft.meta.first_order`) its products R_k c_k (and H_k c_k).

Nothing is written to ``.grad`` (everything is ``torch.autograd.grad``) and the model's parameters are left
exactly as they were: the passes at phi_k and phi_k +- eps c_k swap in new tensors and put the original
``Parameter`` objects back. Random-number state after the call is as after the K train and one val forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from metapeft.meta.distributed import Reduction, as_reduction
from metapeft.meta.exact import EXACT
from metapeft.meta.finite_difference import FD_RADIUS, FINITE_DIFFERENCE
from metapeft.meta.first_order import FIRST_ORDER
from metapeft.meta.fsdp import is_fully_sharded, sharded_hypergradient
from metapeft.meta.inner import InnerRule, SGDRule
from metapeft.meta.lookahead import (
    Problem,
    RngReplay,
    check_lr_scales,
    grads_or_zeros,
    look_ahead,
    reverse,
    shard_weights,
    val_pass,
)
from metapeft.params import meta_parameters, trainable_phi

_MODES = {m.name: m for m in (EXACT, FINITE_DIFFERENCE, FIRST_ORDER)}
MODES = tuple(_MODES)
__all__ = ["FD_RADIUS", "MODES", "HypergradientResult", "hypergradient", "trainable_phi"]


@dataclass
class HypergradientResult:
    """What one meta step computes.

    Attributes:
        meta_grads: d L_val(phi_K) / d rho, one tensor per modulator, in ``meta_parameters(model)`` order
            (each of the modulator's shape, e.g. (S,)).
        lookahead: phi_K, the parameters after the K look-ahead steps, detached, in
            :func:`~metapeft.params.trainable_phi` order.
        phi_grads: g_0 = grad_phi L_train(phi, rho; train_batch) (the global mean when sharded), detached, in
            :func:`~metapeft.params.trainable_phi` order (zeros for a parameter the train loss does not reach);
            feed it to the inner optimizer to take the real step.
        train_loss: L_train(phi, rho; train_batch), detached 0-d tensor.
        val_loss: L_val(phi_K, rho), detached 0-d tensor.
    """

    meta_grads: list[torch.Tensor]
    lookahead: list[torch.Tensor]
    phi_grads: list[torch.Tensor]
    train_loss: torch.Tensor
    val_loss: torch.Tensor


def _check_fd_epsilon(mode, fd_epsilon) -> None:
    if fd_epsilon is not None and (not isinstance(fd_epsilon, (int, float)) or not fd_epsilon > 0.0):
        raise ValueError(f"fd_epsilon must be a float > 0 or None, got {fd_epsilon!r}")
    if fd_epsilon is not None and mode != "finite_difference":
        raise ValueError(f"fd_epsilon is only used by mode='finite_difference', got mode={mode!r}")


def _inner_rule(lr, momentum, momentum_buffers, weight_decay, inner_rule, inner_state) -> InnerRule:
    """SGDRule(lr, momentum, weight_decay), or ``inner_rule`` when given (then no SGD argument may be)."""
    if inner_rule is None:
        if lr is None:
            raise ValueError("give lr (the inner SGD step) or inner_rule")
        if inner_state is not None:
            raise ValueError("inner_state belongs to inner_rule; for SGD pass momentum_buffers")
        return SGDRule(lr, momentum, weight_decay)
    given = [name for name, value, default in (("lr", lr, None), ("momentum", momentum, 0.0),
                                               ("momentum_buffers", momentum_buffers, None),
                                               ("weight_decay", weight_decay, 0.0)) if value != default]
    if given:
        raise ValueError(f"inner_rule={inner_rule!r} carries its own hyperparameters and state; do not also pass "
                         f"{', '.join(given)}")
    return inner_rule


def hypergradient(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    train_batch: Any,
    val_batch: Any,
    *,
    lr: float | None = None,
    momentum: float = 0.0,
    momentum_buffers: Sequence[torch.Tensor | None] | None = None,
    weight_decay: float = 0.0,
    mode: str = "exact",
    fd_epsilon: float | None = None,
    lookahead_batches: Sequence[Any] = (),
    reduce: dist.ProcessGroup | Reduction | None = None,
    lr_scales: Sequence[torch.Tensor | None] | Callable[..., Sequence[torch.Tensor | None]] | None = None,
    inner_rule: InnerRule | None = None,
    inner_state: Sequence[Any] | None = None,
) -> HypergradientResult:
    """One meta step: d L_val(phi_K) / d rho through K look-ahead steps, SGD or ``inner_rule`` (AdamW), see the module
    docstring for the math.

    Args:
        model: a model with metapeft modules; phi = :func:`~metapeft.params.trainable_phi`,
            rho = ``meta_parameters(model)``.
        loss_fn: ``loss_fn(model, batch) -> 0-d loss`` (a mean over the batch), called on the train and val batches.
        train_batch: the batch of look-ahead step 1 (its gradient is ``phi_grads``).
        val_batch: the meta (validation) batch, evaluated at phi_K.
        lr, momentum, weight_decay: the inner SGD step's hyperparameters (dampening 0, no Nesterov;
            :class:`metapeft.meta.inner.SGDRule`).
        momentum_buffers: per phi parameter (``trainable_phi`` order), SGD's momentum buffer from before the
            step or None; ``None`` for the whole list means no momentum term.
        mode: ``"exact"``, ``"finite_difference"`` or ``"first_order"``.
        fd_epsilon: the finite-difference step along c_k (phi_k +- eps * c_k); default ``0.01 / ||c_k||``.
        lookahead_batches: the train batches of look-ahead steps 2..K, so ``lookahead_steps`` K =
            1 + len(lookahead_batches); empty (K = 1) by default.
        reduce: None for a single process; otherwise a ``torch.distributed`` process group, or a callable
            summing a list of tensors over the ranks (:mod:`metapeft.meta.distributed`). Every batch is then
            this rank's shard and every rank must make the same call (same K, same model). On an FSDP2 model None
            means every rank of its mesh.
        lr_scales: per phi parameter (``trainable_phi`` order), a learning-rate multiplier D broadcastable to it
            and differentiable in rho (e.g. :func:`metapeft.params.module_lr_scales`), or None (1); the look-ahead
            steps are ``phi - lr * D * u`` (module docstring). None for the whole list: plain SGD. Or a callable
            ``(model, phi) -> that list``, called once phi is known (e.g. ``module_lr_scales`` itself; needed on an
            FSDP2 model, whose scales must come from the gathered modulators).
        inner_rule, inner_state: instead of ``lr`` / ``momentum`` / ``weight_decay`` / ``momentum_buffers``, another
            inner rule (:class:`metapeft.meta.inner.AdamWRule`, torch's AdamW; e.g. from a live optimizer by
            :func:`metapeft.meta.optim.inner_rule_for`) and its state from before the step, one entry (or None) per
            phi parameter (``trainable_phi`` order; None for the whole list: no step taken yet). The recursion is
            then that rule's adjoint (:mod:`metapeft.meta.inner`).

    Returns a :class:`HypergradientResult` (global over the ranks); the model's parameters and their ``.grad``
    are untouched.
    """
    if is_fully_sharded(model):  # FSDP2: this same call over the gathered parameters (metapeft.meta.fsdp)
        return sharded_hypergradient(hypergradient, dict(locals()))
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rule = _inner_rule(lr, momentum, momentum_buffers, weight_decay, inner_rule, inner_state)
    _check_fd_epsilon(mode, fd_epsilon)
    if not isinstance(lookahead_batches, (list, tuple)):
        raise ValueError(f"lookahead_batches must be a list or tuple of batches (steps 2..K), got "
                         f"{type(lookahead_batches).__name__}")
    reduce = as_reduction(reduce)
    phi, rho = trainable_phi(model), meta_parameters(model)
    if not rho:
        raise ValueError("model has no learnable modulators: meta_parameters(model) is empty")
    if not phi:
        raise ValueError("model has no trainable parameters besides its modulators: trainable_phi(model) is empty")
    buffers = rule.check_state(momentum_buffers if inner_rule is None else inner_state, phi)
    scales = check_lr_scales(lr_scales(model, phi) if callable(lr_scales) else lr_scales, phi)
    names = ["train_batch", *(f"lookahead_batches[{i}]" for i in range(len(lookahead_batches))), "val_batch"]
    batches = dict(zip(names, [train_batch, *lookahead_batches, val_batch]))
    weights = [None] * len(batches) if reduce is None else shard_weights(batches, reduce, phi[0].device)
    engine = _MODES[mode]
    problem = Problem(model, loss_fn, phi, rho, reduce, fd_epsilon,
                      RngReplay({p.device for p in phi}) if engine.replay_rng else None)

    train = {name: batches[name] for name in names[:-1]}
    steps, values, phi_grads, train_loss = look_ahead(problem, rule, engine, train, weights[:-1], buffers, scales)
    with_v = mode != "first_order" or scales is not None
    direct, v, val_loss = val_pass(problem, val_batch, weights[-1], values, with_v)
    if problem.rng is not None:
        problem.rng.mark_end()
    if not with_v:
        meta_grads = direct
    else:
        second, lr_term = reverse(problem, rule, engine, steps, v, scales)
        meta_grads = [d - rule.lr * s for d, s in zip(direct, second)]
        if lr_term is not None and lr_term.requires_grad:
            meta_grads = [g - rule.lr * t for g, t in zip(meta_grads, grads_or_zeros(lr_term, rho))]
    return HypergradientResult(
        meta_grads=[g.detach() for g in meta_grads],
        lookahead=values,
        phi_grads=phi_grads,
        train_loss=train_loss,
        val_loss=val_loss,
    )
