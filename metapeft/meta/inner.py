"""The inner step's update rule, written once: the hypergradient's look-ahead (:func:`metapeft.meta.hypergradient`)
and the trainer's real step (:class:`metapeft.meta.optim.ModuleLRSGD`) both call it.

An inner rule maps (phi_k, g_k, state_k) to (phi_{k+1}, state_{k+1}), one tensor per phi parameter, with an
optional learning-rate multiplier D per parameter (``lr_scales``, the modulator as a module-wise learning rate).
The look-ahead's reverse recursion needs two more things of it: where the adjoint starts (:meth:`adjoint_seed`)
and one step of the adjoint backwards through the rule (:meth:`adjoint_step`); the learning-rate term of the
hypergradient needs the step direction (:meth:`lr_scale_term`). :class:`InnerRule` names that interface; an Adam
rule would carry (exp_avg, exp_avg_sq, step) as its state and write its own adjoint (its update is not linear in
g, so ``adjoint_step`` would also need the state of step k). Only :class:`SGDRule` exists today.
"""

from __future__ import annotations

from typing import Protocol

import torch

Tensors = list[torch.Tensor]


class InnerRule(Protocol):
    """What the look-ahead, its reverse recursion and the trainer's optimizer need of an inner update rule.

    ``lr``: the step size (the learning-rate term of the hypergradient is ``-lr * grad_rho lr_scale_term``)."""

    lr: float

    def update(self, params: Tensors, grads: Tensors, buffers: list[torch.Tensor | None],
               lr_scales: list[torch.Tensor | None] | None = None) -> tuple[Tensors, Tensors]:
        """(phi_{k+1}, state_{k+1}) from phi_k, g_k and state_k (None: no state yet); new tensors, inputs untouched."""

    def adjoint_seed(self, v: Tensors, lr_scales: list[torch.Tensor | None] | None) -> Tensors:
        """c_{K-1}, the adjoint of the last step's direction, from v = grad_phi L_val(phi_K)."""

    def adjoint_step(self, adjoint: Tensors, c: Tensors, hessian_c: Tensors,
                     lr_scales: list[torch.Tensor | None] | None) -> tuple[Tensors, Tensors]:
        """(a_k, c_{k-1}) from a_{k+1}, c_k and H_k c_k: the adjoint one step backwards through the rule."""

    def lr_scale_term(self, lr_scales: list[torch.Tensor | None], directions: Tensors,
                      adjoint: Tensors) -> torch.Tensor:
        """The scalar whose gradient in rho, times ``-lr``, is step k's learning-rate term."""


def scaled(lr_scales: list[torch.Tensor | None] | None, tensors: Tensors) -> Tensors:
    """D * t per phi tensor, D detached (t itself where D is None or no scales are given)."""
    if lr_scales is None:
        return tensors
    return [t if d is None else d.detach() * t for d, t in zip(lr_scales, tensors)]


class SGDRule:
    """torch.optim.SGD's step (dampening 0, no Nesterov, not maximizing) with a learning-rate multiplier D per
    parameter:

        u_k = g_k + wd * phi_k,   m_{k+1} = u_k (no buffer yet) or mu * m_k + u_k,
        phi_{k+1} = phi_k - lr * D * m_{k+1}

    (D = 1 where no multiplier is given; with mu = 0, m_{k+1} = u_k). The ops are torch's single-tensor SGD's in
    its order (``g.add(phi, alpha=wd)``, ``m.mul(mu).add(u)``, ``phi.add(m, alpha=-lr)``), so without multipliers
    the step is bit for bit torch's on CPU. The state is the momentum buffer m (torch's ``momentum_buffer``); the
    step direction is m_{k+1}.

    Reverse through the step (module docstring of :mod:`metapeft.meta.hypergradient`): c_{K-1} = D v,
    a_k = a_{k+1} - lr * (H_k c_k + wd * c_k), c_{k-1} = D a_k + mu * c_k; the learning-rate term is
    ``-lr * (dD/drho)^T (m_{k+1} * a_{k+1})``.
    """

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
                raise ValueError(f"{name} must be a float >= 0, got {value!r}")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def __repr__(self) -> str:
        return f"SGDRule(lr={self.lr!r}, momentum={self.momentum!r}, weight_decay={self.weight_decay!r})"

    @torch.no_grad()
    def update(self, params: Tensors, grads: Tensors, buffers: list[torch.Tensor | None],
               lr_scales: list[torch.Tensor | None] | None = None) -> tuple[Tensors, Tensors]:
        """One step (class docstring). params, grads: phi_k and g_k, one tensor per parameter; buffers: m_k or
        None per parameter (ignored when mu = 0); lr_scales: D (broadcastable to the parameter, detached here) or
        None per parameter, or None. Returns (phi_{k+1}, m_{k+1}) as new tensors; the inputs are untouched."""
        scales = [None] * len(params) if lr_scales is None else lr_scales
        new_params, directions = [], []
        for p, g, m, d in zip(params, grads, buffers, scales):
            u = g.add(p, alpha=self.weight_decay) if self.weight_decay != 0 else g
            if self.momentum != 0:
                u = u.detach().clone() if m is None else m.mul(self.momentum).add(u)
            directions.append(u)
            step = u if d is None else d.detach().to(u.dtype) * u
            new_params.append(p.add(step, alpha=-self.lr))
        return new_params, directions

    @torch.no_grad()
    def adjoint_seed(self, v: Tensors, lr_scales: list[torch.Tensor | None] | None) -> Tensors:
        """c_{K-1} = D v."""
        return scaled(lr_scales, v)

    @torch.no_grad()
    def adjoint_step(self, adjoint: Tensors, c: Tensors, hessian_c: Tensors,
                     lr_scales: list[torch.Tensor | None] | None) -> tuple[Tensors, Tensors]:
        """a_k = a_{k+1} - lr * (H_k c_k + wd * c_k) and c_{k-1} = D a_k + mu * c_k."""
        adjoint = [a - self.lr * (h + self.weight_decay * w) for a, h, w in zip(adjoint, hessian_c, c)]
        c = [a + self.momentum * w for a, w in zip(scaled(lr_scales, adjoint), c)]
        return adjoint, c

    def lr_scale_term(self, lr_scales: list[torch.Tensor | None], directions: Tensors,
                      adjoint: Tensors) -> torch.Tensor:
        """sum over the parameters with a multiplier of <D, m_{k+1} * a_{k+1}>, differentiable in D (0 when none
        has one)."""
        return sum((d * (u * a).detach()).sum() for d, u, a in zip(lr_scales, directions, adjoint) if d is not None)
