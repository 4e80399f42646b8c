"""Optimizers for the modulators rho (the outer loop).

- ``"adam"``: ``torch.optim.Adam`` (the paper's outer optimizer). Its per-coordinate normalisation gives every
  modulator a step of about ``lr`` whatever its hypergradient's size, so a module with a tiny, noisy
  hypergradient moves as far as one with a strong signal.
- ``"shared_adam"``: Adam with ONE second moment shared by all modulators (the mean of the squared
  hypergradient entries), :class:`SharedAdam`: the step's root-mean-square over the modulators is about ``lr``,
  and each modulator moves in proportion to its hypergradient, so the direction of the whole hypergradient (e.g.
  "every scale down") is kept.
- ``"sgd"``: ``torch.optim.SGD`` (plain gradient steps; the step size follows the hypergradient's size).

Also here: :func:`inner_rule_for` (the inner rule and state a live torch SGD or AdamW optimizer would step with),
:class:`ModuleLRSGD` (the inner SGD step with module-wise learning rates; its update is
:class:`metapeft.meta.inner.SGDRule`, the look-ahead's) and
:class:`CommonScaleCalibration` (the warm-up that moves all gammas by one learned factor).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from metapeft.meta.inner import AdamWRule, AdamWState, ClippedRule, InnerRule, SGDRule
from metapeft.modulator import gamma_from_modulator, log_gamma_gradient, modulator_from_gamma

META_OPTIMIZERS = ("adam", "shared_adam", "sgd")


class SharedAdam(torch.optim.Optimizer):
    """Adam whose second moment is one scalar per parameter group: for gradients g (all tensors of the group),

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) mean(g^2),   p <- p - lr * m_hat / (sqrt(v_hat) + eps)

    with the bias corrections of Adam (``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``). ``mean`` runs over
    every entry of every tensor in the group. State: ``exp_avg`` per parameter, ``exp_avg_sq`` (0-d) and ``step``
    in the group's first parameter's state.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a ``.grad`` (module docstring)."""
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            shared = self.state[group["params"][0]]
            if "step" not in shared:
                shared["step"] = torch.zeros((), dtype=torch.float64)
                shared["exp_avg_sq"] = torch.zeros((), dtype=torch.float64, device=params[0].device)
            shared["step"] += 1
            square = sum(p.grad.double().square().sum() for p in params) / sum(p.numel() for p in params)
            shared["exp_avg_sq"].mul_(beta2).add_(square, alpha=1 - beta2)
            step = float(shared["step"])
            denominator = (shared["exp_avg_sq"] / (1 - beta2 ** step)).sqrt() + group["eps"]
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                p.sub_(group["lr"] * state["exp_avg"] / (1 - beta1 ** step) / denominator.to(p.dtype))
        return loss


def meta_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The outer optimizer ``name`` (:data:`META_OPTIMIZERS`) over the modulators ``params`` with learning rate
    ``lr``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "shared_adam":
        return SharedAdam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"meta_optimizer must be one of {META_OPTIMIZERS}, got {name!r}")


class ModuleLRSGD(torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, dampening 0, weight decay, no Nesterov) whose :meth:`step` is
    :class:`metapeft.meta.inner.SGDRule`'s update (the rule the look-ahead takes) and may take a learning-rate
    multiplier per parameter (:func:`metapeft.params.module_lr_scales`, detached):

        buf <- mu * buf + (g + wd * p)   (buf = g + wd * p at the first step),   p <- p - lr * D * buf

    Without multipliers it is torch's SGD step, bit for bit on CPU. The momentum buffer is torch's
    ``momentum_buffer`` state (the same ``state_dict``), so :func:`metapeft.meta.hypergradient` reads it for the
    look-ahead either way."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            if group["nesterov"] or group["dampening"] or group["maximize"]:
                raise ValueError("ModuleLRSGD takes SGDRule's step: no nesterov, dampening or maximize")

    @torch.no_grad()
    def step(self, closure=None, lr_scales: list[torch.Tensor | None] | None = None):
        """One step; ``lr_scales``: one multiplier (broadcastable to the parameter) or None per parameter, in the
        order of the parameter groups."""
        params = [p for group in self.param_groups for p in group["params"]]
        if lr_scales is not None and len(lr_scales) != len(params):
            raise ValueError(f"lr_scales must have one entry per parameter ({len(params)}), got {len(lr_scales)}")
        scales = dict(zip(map(id, params), lr_scales if lr_scales is not None else [None] * len(params)))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rule = SGDRule(group["lr"], group["momentum"], group["weight_decay"])
            stepped = [p for p in group["params"] if p.grad is not None]
            buffers = [self.state[p].get("momentum_buffer") for p in stepped] if rule.momentum != 0 \
                else [None] * len(stepped)
            new_params, new_buffers = rule.update(stepped, [p.grad for p in stepped], buffers,
                                                  [scales[id(p)] for p in stepped])
            for p, value, buffer in zip(stepped, new_params, new_buffers):
                p.copy_(value)
                if rule.momentum != 0:
                    self.state[p]["momentum_buffer"] = buffer
        return loss


def _groups_of(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> list[dict]:
    """The param group of each of ``params``; a clear error for a parameter the optimizer does not hold."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    missing = [i for i, p in enumerate(params) if id(p) not in group_of]
    if missing:
        raise ValueError(f"the optimizer does not hold phi parameters {missing[:5]} (of {len(params)}): the look-ahead "
                         "must step the parameters the optimizer steps")
    return [group_of[id(p)] for p in params]


def _one(groups: list[dict], key: str, optimizer) -> object:
    values = {repr(g[key]) for g in groups}
    if len(values) > 1:
        raise ValueError(f"{type(optimizer).__name__}'s param groups differ in {key} ({sorted(values)}): the "
                         f"look-ahead takes one {key}")
    return groups[0][key]


def inner_rule_for(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                   max_grad_norm: float | None = None) -> tuple[InnerRule, list]:
    """(rule, state): the inner rule (:mod:`metapeft.meta.inner`) that takes ``optimizer``'s next step of ``params``
    (phi, e.g. :func:`metapeft.params.trainable_phi`), with its current learning rate, and the state it starts from
    (one entry per parameter, for :func:`metapeft.meta.hypergradient`'s ``inner_state``). ``max_grad_norm``: the
    caller clips the gradient to this norm before the optimizer's step (``clip_grad_norm_``), so the rule does too
    (:class:`~metapeft.meta.inner.ClippedRule`); None or 0: no clipping.

    - ``torch.optim.AdamW`` (also ``Adam(decoupled_weight_decay=True)``, and ``Adam`` without weight decay; fused,
      foreach or single-tensor): :class:`~metapeft.meta.inner.AdamWRule` with each parameter's group weight decay;
      state :class:`~metapeft.meta.inner.AdamWState` (``exp_avg``, ``exp_avg_sq``, ``step``) or None before its
      first step.
    - ``torch.optim.SGD`` (and :class:`ModuleLRSGD`): :class:`~metapeft.meta.inner.SGDRule`; state the momentum
      buffers (None before the first step).

    Every group must share one learning rate (and for SGD one momentum and weight decay); amsgrad, maximize,
    Nesterov, dampening and other optimizers are refused with a clear error."""
    rule, state = _rule_and_state(optimizer, params)
    return (ClippedRule(rule, max_grad_norm) if max_grad_norm else rule), state


def _rule_and_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> tuple[InnerRule, list]:
    """:func:`inner_rule_for` without clipping."""
    groups = _groups_of(optimizer, params)
    name = type(optimizer).__name__
    if any(g.get("maximize") for g in groups):
        raise ValueError(f"{name} with maximize=True is not supported by the look-ahead")
    lr = float(_one(groups, "lr", optimizer))
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass of Adam in torch >= 2.6
        decoupled = isinstance(optimizer, torch.optim.AdamW) or groups[0].get("decoupled_weight_decay", False)
        if not decoupled and any(g["weight_decay"] for g in groups):
            raise ValueError("torch.optim.Adam with weight_decay > 0 adds L2 to the gradient; the look-ahead follows "
                             "AdamW (decoupled weight decay): use torch.optim.AdamW or weight_decay=0")
        if any(g["amsgrad"] for g in groups):
            raise ValueError(f"{name} with amsgrad=True is not supported by the look-ahead (AdamWRule)")
        rule = AdamWRule(lr, tuple(float(b) for b in _one(groups, "betas", optimizer)),
                         float(_one(groups, "eps", optimizer)), [float(g["weight_decay"]) for g in groups])
        state = []
        for p in params:
            s = optimizer.state.get(p, {})
            state.append(AdamWState(s["exp_avg"], s["exp_avg_sq"], float(s["step"])) if "step" in s else None)
        return rule, state
    if isinstance(optimizer, torch.optim.SGD):
        if any(g["nesterov"] or g["dampening"] for g in groups):
            raise ValueError(f"{name} with nesterov or dampening is not supported by the look-ahead (SGDRule)")
        momentum = float(_one(groups, "momentum", optimizer))
        rule = SGDRule(lr, momentum, float(_one(groups, "weight_decay", optimizer)))
        return rule, [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
    raise ValueError(f"the look-ahead follows torch.optim.SGD or torch.optim.AdamW; {name} has no inner rule")


class CommonScaleCalibration:
    """Shrinks every modulator's gamma by one common factor while the meta loss says the scale is too large: the
    warm-up that rescues a far-too-large scale before the first inner step.

    With ``gamma_m = gamma0_m * exp(s)`` for every modulator entry m (gamma0: the gammas when the calibration
    starts), ``d L_val / d s = sum_m d L_val / d log(gamma_m)`` is the derivative of the one-step look-ahead's meta
    loss along "every scale up". Each :meth:`step` takes that sum from several hypergradients at the current s (fresh
    train and meta batches each) and, when a one-sided 95 % Student-t test says it is positive (the step overshoots),
    halves every gamma (``s -= log_step``; log_step ln 2). When the test stops saying so after at least one move, the
    scale goes one ``log_step`` further down and the calibration ends: the one-step look-ahead's best scale sits at
    the edge of the scales that train stably (docs/figures/effective_lr.png: the meta loss is lowest at twice the
    scale where it starts to climb). It never moves up: a too-small scale barely moves a one-step look-ahead (its
    effect grows with the scale squared) and its sign flips from batch to batch (docs/method.md). Why a common
    factor and not per-module steps: the per-module hypergradients disagree in sign at a too-large scale, so
    per-module steps spread the gammas apart; their sum does not.

    Args:
        modulators: ``(rho, constraint)`` per learnable modulator (:func:`metapeft.params.modulators_with_constraints`).
        log_step: how far one move goes (every gamma times ``exp(-log_step)``).
    """

    def __init__(self, modulators: list[tuple[torch.nn.Parameter, str]], log_step: float) -> None:
        if not log_step > 0:
            raise ValueError(f"log_step must be > 0, got {log_step!r}")
        if not modulators:
            raise ValueError("CommonScaleCalibration needs at least one learnable modulator")
        self.modulators, self.log_step = modulators, float(log_step)
        self.log_scale = 0.0
        self.history: list[dict] = []
        with torch.no_grad():
            self.initial = [gamma_from_modulator(rho, c).double() for rho, c in modulators]

    def common_gradient(self, meta_grads: list[torch.Tensor]) -> float:
        """d L_val / d s from one hypergradient (d L_val / d rho per modulator, ``meta_parameters`` order)."""
        with torch.no_grad():
            return float(sum(log_gamma_gradient(g.double(), rho.double(), c).sum()
                             for g, (rho, c) in zip(meta_grads, self.modulators)))

    @torch.no_grad()
    def step(self, hypergradients: list[list[torch.Tensor]]) -> bool:
        """Test the mean of :meth:`common_gradient` over ``hypergradients`` (at least 2): when it is positive at 95 %
        (one-sided), shrink s by ``log_step`` and return True (the caller tests again); otherwise, if s has moved
        before, shrink it once more, and return False (the caller stops). The gammas are written as
        ``rho_m = gamma^-1(gamma0_m * exp(s))``; every call is recorded in :attr:`history` (s after it, the mean, the
        one-sided bound, whether the test said shrink)."""
        from scipy.stats import t

        values = [self.common_gradient(g) for g in hypergradients]
        n = len(values)
        if n < 2:
            raise ValueError(f"the calibration's test needs at least 2 hypergradients, got {n}")
        mean = sum(values) / n
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        bound = float(t.ppf(0.95, n - 1)) * spread / math.sqrt(n)
        overshoots = mean > bound
        if overshoots or self.log_scale < 0:
            self.log_scale -= self.log_step
            for (rho, constraint), gamma0 in zip(self.modulators, self.initial):
                rho.copy_(modulator_from_gamma(gamma0 * math.exp(self.log_scale), constraint).to(rho.dtype))
        self.history.append({"log_scale": self.log_scale, "mean": mean, "bound": bound, "overshoots": overshoots})
        return overshoots
