"""The machinery every hypergradient mode shares (:mod:`metapeft.meta.hypergradient` has the math): the checks of
the arguments, shard weights, swapping phi for other values, replaying a step's random numbers, the forward
look-ahead through the inner rule (:mod:`metapeft.meta.inner`) and the reverse recursion, which asks the mode
(:class:`Mode`: :mod:`~metapeft.meta.exact`, :mod:`~metapeft.meta.finite_difference`,
:mod:`~metapeft.meta.first_order`) for each step's products R_k c_k (and H_k c_k).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metapeft.meta.attention import math_attention
from metapeft.meta.distributed import Reduction
from metapeft.meta.inner import InnerRule, entries_per_phi
from metapeft.ops import double_backward_ahead


@contextlib.contextmanager
def parameters_replaced(model: nn.Module, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor],
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


class RngReplay:
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


def checked_loss(loss_fn: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module, batch: Any,
                 which: str) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise ValueError(f"loss_fn(model, {which}) must return a floating scalar tensor, got "
                         f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not loss.requires_grad:
        raise ValueError(f"loss_fn(model, {which}) does not depend on any trainable parameter")
    return loss.reshape(())


def grads_or_zeros(outputs, inputs, **kwargs) -> list[torch.Tensor]:
    """``torch.autograd.grad`` with zeros for inputs the outputs do not reach."""
    grads = torch.autograd.grad(outputs, inputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)]


def check_lr_scales(scales, phi: list[nn.Parameter]) -> list[torch.Tensor | None] | None:
    scales = entries_per_phi(scales, phi, "lr_scales")
    if scales is None:
        return None
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


def sample_count(batch: Any) -> int | None:
    """Length of dim 0 of the first tensor in ``batch`` (depth-first through tuples, lists, dict values)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        count = sample_count(item)
        if count is not None:
            return count
    return None


def shard_weights(batches: dict[str, Any], reduce: Reduction, device: torch.device) -> list[float]:
    """Per batch, this rank's share of the global batch (local size / sum of the sizes over ranks)."""
    local = []
    for name, batch in batches.items():
        count = sample_count(batch)
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


def rank_sum_or_local(reduce: Reduction | None, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors if reduce is None else reduce(tensors)



class Step:
    """One look-ahead step's record: phi_k (values), the tensors its gradient was taken with respect to, its
    shard's weight and batch, g_k and the rule's state after the step (``grads``, ``updates``: the
    :class:`~metapeft.meta.inner.StepRecord` the rule's adjoint reads), and (exact mode) the rank-local gradient
    with its double-differentiable graph."""

    def __init__(self, values: list[torch.Tensor], batch: Any, weight: float | None, name: str) -> None:
        self.values, self.batch, self.weight, self.name = values, batch, weight, name
        self.updates: list = []
        self.grads: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.local_grads: list[torch.Tensor] = []

    @property
    def empty(self) -> bool:
        return self.weight == 0.0

    def weighted_loss(self, loss_fn, model: nn.Module) -> torch.Tensor:
        loss = checked_loss(loss_fn, model, self.batch, self.name)
        return loss if self.weight is None else loss * self.weight



@dataclass
class Problem:
    """One meta step's fixed inputs, as the modes' products read them: the model, the loss, phi and rho (their
    ``Parameter`` objects), the reduction over ranks (None: one process), the finite-difference step (None:
    ``FD_RADIUS / ||c_k||``) and the random-number replay (finite difference only)."""

    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    phi: list[nn.Parameter]
    rho: list[nn.Parameter]
    reduce: Reduction | None
    fd_epsilon: float | None = None
    rng: RngReplay | None = None


@dataclass(frozen=True)
class Mode:
    """A hypergradient mode: how it takes the train gradients and the products of its reverse recursion.

    Attributes:
        name: the ``mode=`` string.
        create_graph: the look-ahead's train backward keeps a double-differentiable graph (exact mode).
        replay_rng: the products replay each step's random numbers (finite difference).
        reduces_products: H_k c_k is a rank-local product to be summed over ranks (False: it is zero).
        products: ``products(problem, step, k, c, with_phi)`` -> R_k c (one tensor per rho) followed, when
            ``with_phi``, by H_k c (one per phi), on this rank's shard of step k.
    """

    name: str
    create_graph: bool
    replay_rng: bool
    reduces_products: bool
    products: Callable[[Problem, Step, int, list[torch.Tensor], bool], list[torch.Tensor]]


def zero_products(problem: Problem, c: list[torch.Tensor], with_phi: bool) -> list[torch.Tensor]:
    """R_k c = 0 (and H_k c = 0 when ``with_phi``)."""
    return [torch.zeros_like(p) for p in problem.rho] + ([torch.zeros_like(w) for w in c] if with_phi else [])


def step_gradient(problem: Problem, step: Step, at_phi: bool, create_graph: bool):
    """g_k and L_train of look-ahead step ``step`` (global when sharded), detached; keeps the rank-local
    gradient (with its graph when ``create_graph``) and its inputs on ``step``. ``at_phi``: step 0, whose
    gradient is taken with respect to the model's own parameters."""
    model, phi = problem.model, problem.phi
    if step.empty:
        local = [torch.zeros_like(p) for p in phi]
        loss = torch.zeros((), dtype=phi[0].dtype, device=phi[0].device)
    else:
        swapped = contextlib.nullcontext(phi) if at_phi else parameters_replaced(model, phi, step.values, True)
        double_backward = contextlib.ExitStack()
        if create_graph:
            double_backward.enter_context(math_attention(model))
            double_backward.enter_context(double_backward_ahead())
        with swapped as inputs, double_backward:
            loss = step.weighted_loss(problem.loss_fn, model)
        local = grads_or_zeros(loss, inputs, create_graph=create_graph)
        step.inputs = inputs
        loss = loss.detach()
    if create_graph:
        step.local_grads = local
    *grads, loss = rank_sum_or_local(problem.reduce, [g.detach() for g in local] + [loss.reshape(1)])
    return grads, loss.reshape(())


def look_ahead(problem: Problem, rule: InnerRule, mode: Mode, batches: dict[str, Any], weights: list[float | None],
               buffers: list[torch.Tensor | None], scales: list[torch.Tensor | None] | None):
    """The K forward steps phi_{k+1} = rule.update(phi_k, g_k, m_k), one per train batch of ``batches`` (name ->
    this rank's shard). Returns (the steps' records, phi_K, g_0, L_train at step 0)."""
    steps, values = [], list(problem.phi)
    for (name, batch), weight in zip(batches.items(), weights):
        step = Step(values, batch, weight, name)
        if problem.rng is not None:
            problem.rng.mark_step()
        grads, loss = step_gradient(problem, step, at_phi=not steps, create_graph=mode.create_graph)
        if not steps:
            phi_grads, train_loss = grads, loss
        values, buffers = rule.update(values, grads, buffers, scales)
        step.grads, step.updates = grads, buffers
        steps.append(step)
    return steps, values, phi_grads, train_loss


def val_pass(problem: Problem, val_batch, weight, values, with_v: bool):
    """(direct term, v, L_val) at phi_K from this rank's val shard, summed over ranks; v is [] unless ``with_v``."""
    phi, rho = problem.phi, problem.rho
    with parameters_replaced(problem.model, phi, values, requires_grad=with_v) as leaves:
        inputs = rho + (leaves if with_v else [])
        if weight == 0.0:
            local = [torch.zeros_like(p) for p in inputs]
            loss = torch.zeros((), dtype=phi[0].dtype, device=phi[0].device)
        else:
            loss = checked_loss(problem.loss_fn, problem.model, val_batch, "val_batch")
            loss = loss if weight is None else loss * weight
            local = grads_or_zeros(loss, inputs)
            loss = loss.detach()
    *grads, loss = rank_sum_or_local(problem.reduce, local + [loss.reshape(1)])
    return grads[: len(rho)], grads[len(rho):], loss.reshape(())


def reverse(problem: Problem, rule: InnerRule, mode: Mode, steps: list[Step], v: list[torch.Tensor],
            scales: list[torch.Tensor | None] | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(sum_k R_k c_k summed over ranks, and with ``scales`` the scalar sum_k of the rule's learning-rate terms
    whose gradient in rho, times -lr, is the learning-rate term, else None): the reverse recursion through the
    rule's adjoint (:meth:`~metapeft.meta.inner.InnerRule.adjoint_step`), with the mode's products."""
    rho = problem.rho
    adjoint, c = rule.adjoint_seed(v, scales, steps[-1])
    rho_term = [torch.zeros_like(p) for p in rho]
    lr_term = None
    for k in range(len(steps) - 1, -1, -1):
        step = steps[k]
        with_phi = k > 0
        if scales is not None:
            term = rule.lr_scale_term(scales, step, adjoint)
            lr_term = term if lr_term is None else lr_term + term
        products = mode.products(problem, step, k, c, with_phi)
        rho_term = [t + r for t, r in zip(rho_term, products[: len(rho)])]
        if with_phi:
            hessian_c = products[len(rho):]
            if mode.reduces_products:
                hessian_c = rank_sum_or_local(problem.reduce, hessian_c)
            adjoint, c = rule.adjoint_step(adjoint, c, hessian_c, scales, steps[k - 1])
    return rank_sum_or_local(problem.reduce, rho_term), lr_term
