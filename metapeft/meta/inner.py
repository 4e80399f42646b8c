"""The inner step's update rule, written once: the hypergradient's look-ahead (:func:`metapeft.meta.hypergradient`)
and the trainer's real step (:class:`metapeft.meta.optim.ModuleLRSGD`) both call it.

An inner rule maps (phi_k, g_k, state_k) to (phi_{k+1}, state_{k+1}), one tensor per phi parameter, with an
optional learning-rate multiplier D per parameter (``lr_scales``, the modulator as a module-wise learning rate).
The look-ahead's reverse recursion needs two more things of it: where the adjoint starts (:meth:`adjoint_seed`)
and one step of the adjoint backwards through the rule (:meth:`adjoint_step`); the learning-rate term of the
hypergradient needs the step direction (:meth:`lr_scale_term`). :class:`InnerRule` names that interface. The
adjoint methods get the look-ahead's record of a step (:class:`StepRecord`: phi_k, g_k and the state after the
step) and carry their own reverse state between steps (SGD: the adjoint a_k; AdamW: a_k and the adjoints of its two
moments). Two rules: :class:`SGDRule` (torch's SGD) and :class:`AdamWRule` (torch's AdamW, whose update is not
linear in g: its adjoint reads step k's moments and gradient).

Convention of every rule: c_k = -(1 / lr) dL_val / dg_k, so the second-order term of the hypergradient is
``-lr * sum_k R_k c_k`` whatever the rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

Tensors = list[torch.Tensor]


class StepRecord(Protocol):
    """What the look-ahead keeps of step k for the rule's adjoint: ``values`` phi_k, ``grads`` g_k (the global
    gradient, detached) and ``updates`` the rule's state after the step (the second result of ``update``)."""

    values: Tensors
    grads: Tensors
    updates: list


class InnerRule(Protocol):
    """What the look-ahead, its reverse recursion and the trainer's optimizer need of an inner update rule.

    ``lr``: the step size (the learning-rate term of the hypergradient is ``-lr * grad_rho lr_scale_term``).
    ``carry``: the rule's own reverse state, handed from one adjoint call to the next (it holds a_{k+1})."""

    lr: float

    def update(self, params: Tensors, grads: Tensors, state: list,
               lr_scales: list[torch.Tensor | None] | None = None) -> tuple[Tensors, list]:
        """(phi_{k+1}, state_{k+1}) from phi_k, g_k and state_k (None per parameter: no state yet); new tensors,
        inputs untouched."""

    def check_state(self, state, phi: Tensors) -> list:
        """``state`` (one entry or None per parameter of ``phi``; None for all: no step taken yet) checked against
        the parameters' shapes and devices; the per-parameter list ``update`` takes."""

    def adjoint_seed(self, v: Tensors, lr_scales: list[torch.Tensor | None] | None,
                     last: StepRecord) -> tuple[object, Tensors]:
        """(carry, c_{K-1}) from v = grad_phi L_val(phi_K) and the record of the last step K-1."""

    def adjoint_step(self, carry: object, c: Tensors, hessian_c: Tensors, lr_scales: list[torch.Tensor | None] | None,
                     previous: StepRecord) -> tuple[object, Tensors]:
        """(carry, c_{k-1}) from step k's carry, c_k and H_k c_k, and the record of step k-1: the adjoint one step
        backwards through the rule."""

    def lr_scale_term(self, lr_scales: list[torch.Tensor | None], record: StepRecord, carry: object) -> torch.Tensor:
        """The scalar whose gradient in rho, times ``-lr``, is step k's learning-rate term (``record``: step k's)."""


def entries_per_phi(values, phi: Tensors, what: str) -> list | None:
    """``values`` as a list of one entry per phi parameter (None stays None); a ``ValueError`` naming ``what``
    otherwise."""
    if values is None:
        return None
    values = list(values)
    if len(values) != len(phi):
        raise ValueError(f"{what} must have one entry (or None) per trainable_phi(model) parameter ({len(phi)}), "
                         f"got {len(values)}")
    return values


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

    def check_state(self, buffers, phi: Tensors) -> list[torch.Tensor | None]:
        """``buffers`` (``momentum_buffers``: one momentum buffer or None per parameter of ``phi``; None for all: no
        buffer yet) checked against the parameters' shapes and devices."""
        buffers = entries_per_phi(buffers, phi, "momentum_buffers")
        if buffers is None:
            return [None] * len(phi)
        for i, (m, p) in enumerate(zip(buffers, phi)):
            if m is not None and (not isinstance(m, torch.Tensor) or m.shape != p.shape or m.device != p.device):
                got = f"{type(m).__name__}{tuple(m.shape) if isinstance(m, torch.Tensor) else ''}"
                raise ValueError(f"momentum_buffers[{i}] must be None or a tensor of shape {tuple(p.shape)} on "
                                 f"{p.device}, got {got}")
        return buffers

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
    def adjoint_seed(self, v: Tensors, lr_scales: list[torch.Tensor | None] | None,
                     last: StepRecord | None = None) -> tuple[Tensors, Tensors]:
        """(a_K = v, c_{K-1} = D v); the carry is the adjoint a."""
        return v, scaled(lr_scales, v)

    @torch.no_grad()
    def adjoint_step(self, adjoint: Tensors, c: Tensors, hessian_c: Tensors,
                     lr_scales: list[torch.Tensor | None] | None,
                     previous: StepRecord | None = None) -> tuple[Tensors, Tensors]:
        """a_k = a_{k+1} - lr * (H_k c_k + wd * c_k) and c_{k-1} = D a_k + mu * c_k (no record needed)."""
        adjoint = [a - self.lr * (h + self.weight_decay * w) for a, h, w in zip(adjoint, hessian_c, c)]
        c = [a + self.momentum * w for a, w in zip(scaled(lr_scales, adjoint), c)]
        return adjoint, c

    def lr_scale_term(self, lr_scales: list[torch.Tensor | None], record: StepRecord,
                      adjoint: Tensors) -> torch.Tensor:
        """sum over the parameters with a multiplier of <D, m_{k+1} * a_{k+1}>, differentiable in D (0 when none
        has one)."""
        return sum((d * (u * a).detach()).sum() for d, u, a in zip(lr_scales, record.updates, adjoint)
                   if d is not None)


class AdamWState(NamedTuple):
    """One parameter's AdamW state, torch's names: ``exp_avg`` m and ``exp_avg_sq`` v (the parameter's shape and
    dtype) and ``step`` t, the number of steps taken (a Python float; torch keeps a 0-d tensor)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: float


class AdamWCarry(NamedTuple):
    """AdamW's reverse state after step k's adjoint: ``adjoint`` a_{k+1} = dL/dphi_{k+1}, and ``exp_avg`` /
    ``exp_avg_sq`` the adjoints of m_k and v_k, both divided by lr."""

    adjoint: Tensors
    exp_avg: Tensors
    exp_avg_sq: Tensors


class AdamWRule:
    """torch.optim.AdamW's step (``amsgrad=False``, not maximizing) with a learning-rate multiplier D per parameter:

        t <- t + 1,   m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,
        phi <- phi - lr * D * (wd * phi + (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)),   bc_i = 1 - b_i^t

    (decoupled weight decay, eps outside the square root; D = 1 where no multiplier is given). Without multipliers
    the ops are torch's single-tensor AdamW's in its order (``phi.mul(1 - lr * wd)``, ``m.lerp(g, 1 - b1)``,
    ``v.mul(b2).addcmul(g, g, value=1 - b2)``, ``phi.addcdiv(m, denom, value=-lr / bc1)``), so the step is torch's
    bit for bit on CPU. The state is :class:`AdamWState` (torch's ``exp_avg``, ``exp_avg_sq``, ``step``; None per
    parameter: no step taken yet, zeros and t = 0). ``weight_decay`` is one float or one per parameter (a Trainer's
    no-decay group).

    Reverse through step k (u = m_{k+1}, w = v_{k+1}, denom = sqrt(w) / sqrt(bc2) + eps, every adjoint of m and v
    divided by lr; ``a`` = a_{k+1}, ``mu``, ``nu`` the scaled adjoints of m_{k+1}, v_{k+1}, zero after the last
    step):

        U = mu - a * D / (bc1 * denom),      W = nu + a * D * u / (2 bc1 sqrt(bc2) denom^2 sqrt(w))   (0 where w = 0)
        c_k = -((1 - b1) U + 2 (1 - b2) g_k W),    mu_k = b1 U,   nu_k = b2 W,
        a_k = a_{k+1} * (1 - lr * D * wd) - lr * H_k c_k

    (at w = 0, g = m = 0 and the exact limit of W's term is 0). The learning-rate term of step k is
    ``-lr * (dD/drho)^T (s_k * a_{k+1})`` with the direction s_k = wd * phi_k + (u / bc1) / denom.
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float | Sequence[float] = 1e-2, amsgrad: bool = False) -> None:
        if amsgrad:
            raise ValueError("AdamWRule does not support amsgrad=True (the max over past second moments has no "
                             "adjoint here); use amsgrad=False")
        decays = list(weight_decay) if isinstance(weight_decay, (list, tuple)) else [weight_decay]
        for name, value in (("lr", lr), ("eps", eps), *(("weight_decay", w) for w in decays)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
                raise ValueError(f"{name} must be a float >= 0, got {value!r}")
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay

    def __repr__(self) -> str:
        return (f"AdamWRule(lr={self.lr!r}, betas={self.betas!r}, eps={self.eps!r}, "
                f"weight_decay={self.weight_decay!r})")

    def decays(self, count: int) -> list[float]:
        """The weight decay of each of ``count`` parameters."""
        if not isinstance(self.weight_decay, (list, tuple)):
            return [self.weight_decay] * count
        if len(self.weight_decay) != count:
            raise ValueError(f"weight_decay has {len(self.weight_decay)} entries for {count} parameters")
        return list(self.weight_decay)

    def check_state(self, state, phi: Tensors) -> list[AdamWState | None]:
        """``state`` (one :class:`AdamWState` or None per parameter of ``phi``; None for all: no step yet) checked
        against the parameters' shapes and devices."""
        state = entries_per_phi(state, phi, "the AdamW state")
        if state is None:
            return [None] * len(phi)
        for i, (s, p) in enumerate(zip(state, phi)):
            if s is None:
                continue
            if not isinstance(s, AdamWState) or any(
                    not isinstance(t, torch.Tensor) or t.shape != p.shape or t.device != p.device
                    for t in (s.exp_avg, s.exp_avg_sq)):
                raise ValueError(f"AdamW state [{i}] must be None or an AdamWState with exp_avg and exp_avg_sq of "
                                 f"shape {tuple(p.shape)} on {p.device}, got {s!r:.200}")
        return state

    def _moments(self, g: torch.Tensor, state: AdamWState | None) -> AdamWState:
        b1, b2 = self.betas
        if state is None:
            state = AdamWState(torch.zeros_like(g), torch.zeros_like(g), 0.0)
        exp_avg = state.exp_avg.lerp(g, 1 - b1)
        exp_avg_sq = state.exp_avg_sq.mul(b2).addcmul(g, g, value=1 - b2)
        return AdamWState(exp_avg, exp_avg_sq, float(state.step) + 1)

    def _denominator(self, state: AdamWState) -> tuple[torch.Tensor, float, float]:
        """(sqrt(v) / sqrt(bc2) + eps, bc1, sqrt(bc2)) of the state after a step."""
        b1, b2 = self.betas
        bias_correction1, bias_correction2_sqrt = 1 - b1 ** state.step, (1 - b2 ** state.step) ** 0.5
        return (state.exp_avg_sq.sqrt() / bias_correction2_sqrt).add(self.eps), bias_correction1, bias_correction2_sqrt

    @torch.no_grad()
    def update(self, params: Tensors, grads: Tensors, state: list[AdamWState | None],
               lr_scales: list[torch.Tensor | None] | None = None) -> tuple[Tensors, list[AdamWState]]:
        """One step (class docstring). params, grads: phi_k and g_k, one tensor per parameter; state: its
        :class:`AdamWState` or None per parameter; lr_scales: D (broadcastable, detached here) or None per parameter,
        or None. Returns (phi_{k+1}, state_{k+1}) as new tensors; the inputs are untouched."""
        scales = [None] * len(params) if lr_scales is None else lr_scales
        new_params, new_state = [], []
        for p, g, s, d, wd in zip(params, grads, state, scales, self.decays(len(params))):
            s = self._moments(g, s)
            denom, bias_correction1, _ = self._denominator(s)
            if d is None:
                decayed = p.mul(1 - self.lr * wd) if wd != 0 else p
                new_params.append(decayed.addcdiv(s.exp_avg, denom, value=-self.lr / bias_correction1))
            else:
                d = d.detach().to(p.dtype)
                new_params.append(p - self.lr * d * (wd * p + s.exp_avg / bias_correction1 / denom))
            new_state.append(s)
        return new_params, new_state

    def _adjoint_through(self, adjoint: Tensors, moments: tuple[Tensors, Tensors],
                         lr_scales: list[torch.Tensor | None] | None, record: StepRecord) -> tuple[AdamWCarry, Tensors]:
        """(carry with a = ``adjoint``, c_k) for step k (``record``), given a_{k+1} and the scaled adjoints of
        m_{k+1}, v_{k+1}."""
        b1, b2 = self.betas
        scales = [None] * len(adjoint) if lr_scales is None else lr_scales
        mus, nus, c = [], [], []
        for a, mu, nu, g, s, d in zip(adjoint, *moments, record.grads, record.updates, scales):
            denom, bias_correction1, bias_correction2_sqrt = self._denominator(s)
            d = 1.0 if d is None else d.detach().to(a.dtype)
            root = s.exp_avg_sq.sqrt()
            u_bar = mu - a * d / (bias_correction1 * denom)
            w_term = a * d * s.exp_avg / (2 * bias_correction1 * bias_correction2_sqrt * denom.square() * root)
            w_bar = nu + torch.where(root > 0, w_term, torch.zeros_like(w_term))
            c.append(-((1 - b1) * u_bar + 2 * (1 - b2) * g * w_bar))
            mus.append(b1 * u_bar)
            nus.append(b2 * w_bar)
        return AdamWCarry(adjoint, mus, nus), c

    @torch.no_grad()
    def adjoint_seed(self, v: Tensors, lr_scales: list[torch.Tensor | None] | None,
                     last: StepRecord) -> tuple[AdamWCarry, Tensors]:
        """(carry, c_{K-1}) from v = a_K, the moments' adjoints zero."""
        zeros = [torch.zeros_like(t) for t in v]
        return self._adjoint_through(v, (zeros, zeros), lr_scales, last)

    @torch.no_grad()
    def adjoint_step(self, carry: AdamWCarry, c: Tensors, hessian_c: Tensors,
                     lr_scales: list[torch.Tensor | None] | None,
                     previous: StepRecord) -> tuple[AdamWCarry, Tensors]:
        """a_k = a_{k+1} * (1 - lr * D * wd) - lr * H_k c_k, then c_{k-1} through step k-1 (``previous``)."""
        scales = [None] * len(c) if lr_scales is None else lr_scales
        adjoint = []
        for a, h, d, wd in zip(carry.adjoint, hessian_c, scales, self.decays(len(c))):
            decay = self.lr * wd if d is None else self.lr * wd * d.detach().to(a.dtype)
            adjoint.append(a - decay * a - self.lr * h)
        return self._adjoint_through(adjoint, (carry.exp_avg, carry.exp_avg_sq), lr_scales, previous)

    def lr_scale_term(self, lr_scales: list[torch.Tensor | None], record: StepRecord,
                      carry: AdamWCarry) -> torch.Tensor:
        """sum over the parameters with a multiplier of <D, s_k * a_{k+1}>, s_k the step's direction, differentiable
        in D (0 when none has one)."""
        terms = []
        for d, p, s, a, wd in zip(lr_scales, record.values, record.updates, carry.adjoint,
                                  self.decays(len(lr_scales))):
            if d is not None:
                denom, bias_correction1, _ = self._denominator(s)
                direction = (wd * p.detach() + s.exp_avg / bias_correction1 / denom)
                terms.append((d * (direction * a).detach()).sum())
        return sum(terms)


# torch.nn.utils.clip_grad_norm_'s guard in its coefficient max_norm / (total_norm + eps)
CLIP_EPS = 1e-6


class ClippedRecord(NamedTuple):
    """A :class:`StepRecord` whose ``grads`` are the clipped gradients the inner rule stepped with."""

    values: Tensors
    grads: Tensors
    updates: list


class ClippedRule:
    """``inner``'s step on the gradient clipped to a global norm of at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` clips it before the optimizer's step:

        g~ = s g,   s = min(1, max_norm / (||g|| + eps)),   ||g|| the 2-norm over every phi tensor (eps 1e-6).

    Its adjoint maps the inner rule's c~_k = -(1 / lr) dL_val / dg~_k to the c_k of the unclipped gradient by the
    clip's Jacobian (symmetric), J c~ = s c~ - max_norm (g . c~) g / (||g|| (||g|| + eps)^2) where it clips and c~
    where it does not; the modes' products H_k c_k and R_k c_k are then those of the model's gradient, and the inner
    rule's adjoint runs on the clipped records (the gradients it stepped with). The carry is (inner carry, c~_k)."""

    def __init__(self, inner: InnerRule, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        self.inner, self.max_norm, self.lr = inner, float(max_norm), inner.lr

    def __repr__(self) -> str:
        return f"ClippedRule({self.inner!r}, max_norm={self.max_norm!r})"

    def _norm(self, grads: Tensors) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    def clipped(self, grads: Tensors) -> Tensors:
        """The gradients (one per phi tensor) as ``clip_grad_norm_(max_norm)`` leaves them; new tensors."""
        coefficient = torch.clamp(self.max_norm / (self._norm(grads) + CLIP_EPS), max=1.0)
        return [g * coefficient.to(g.dtype) for g in grads]

    @torch.no_grad()
    def _transpose(self, grads: Tensors, c: Tensors) -> Tensors:
        """J^T c at the (unclipped) gradients ``grads`` (no host sync: where the clip is inactive s = 1 and the
        second term is 0)."""
        norm = self._norm(grads)
        coefficient = self.max_norm / (norm + CLIP_EPS)
        s = torch.clamp(coefficient, max=1.0)
        dot = sum((g * t).sum() for g, t in zip(grads, c))
        along = torch.where(coefficient < 1.0, dot * self.max_norm / (norm * (norm + CLIP_EPS) ** 2),
                            torch.zeros_like(dot))
        return [s.to(t.dtype) * t - along.to(g.dtype) * g for g, t in zip(grads, c)]

    def _record(self, record: StepRecord) -> ClippedRecord:
        return ClippedRecord(record.values, self.clipped(record.grads), record.updates)

    def update(self, params: Tensors, grads: Tensors, state: list,
               lr_scales: list[torch.Tensor | None] | None = None) -> tuple[Tensors, list]:
        """``inner.update`` with the clipped gradients."""
        return self.inner.update(params, self.clipped(grads), state, lr_scales)

    def check_state(self, state, phi: Tensors) -> list:
        """``inner.check_state``."""
        return self.inner.check_state(state, phi)

    def adjoint_seed(self, v: Tensors, lr_scales: list[torch.Tensor | None] | None,
                     last: StepRecord) -> tuple[tuple, Tensors]:
        """The inner seed on the clipped record; c_{K-1} = J^T c~_{K-1}."""
        carry, c_inner = self.inner.adjoint_seed(v, lr_scales, self._record(last))
        return (carry, c_inner), self._transpose(last.grads, c_inner)

    def adjoint_step(self, carry: tuple, c: Tensors, hessian_c: Tensors, lr_scales: list[torch.Tensor | None] | None,
                     previous: StepRecord) -> tuple[tuple, Tensors]:
        """The inner adjoint step with its own c~_k (``hessian_c`` = H_k J^T c~_k, the inner rule's H c through the
        clip); c_{k-1} = J^T c~_{k-1}."""
        inner_carry, c_inner = carry
        inner_carry, c_previous = self.inner.adjoint_step(inner_carry, c_inner, hessian_c, lr_scales,
                                                          self._record(previous))
        return (inner_carry, c_previous), self._transpose(previous.grads, c_previous)

    def lr_scale_term(self, lr_scales: list[torch.Tensor | None], record: StepRecord, carry: tuple) -> torch.Tensor:
        """``inner.lr_scale_term`` on the clipped record."""
        return self.inner.lr_scale_term(lr_scales, self._record(record), carry[0])
