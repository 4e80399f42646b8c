"""Independent, plainly written oracles for the tests (run them in float64): never a user backend, never a
benchmark contender (``benchmarks/contenders.py`` holds the strongest plain-PyTorch formulations for that).

- :func:`scaled_lora_reference` / :func:`adapter_reference`: the ops written step by step, HF-PEFT style,
  autograd through all of it (it keeps several M x N tensors and a dropout mask: fine for an oracle);
- :class:`ReferenceMetaLoRA` / :class:`ReferenceMetaAdapter`: modules with the fused layers' parameter names;
- :func:`brute_force_hypergradient`: the meta step's hypergradient by ``torch.func`` double differentiation
  through a twin of the model built from those modules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metapeft.layers import FusedMetaAdapter, FusedMetaLoRA
from metapeft.meta import math_attention
from metapeft.modulator import modulator_for_gamma
from metapeft.ops.dropout import dropout_keep_mask
from metapeft.params import meta_parameters, trainable_phi


def reference_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout with the same seeded mask as the ``torch`` backend, applied as a stored mask."""
    if p == 0.0:
        return x
    mask = dropout_keep_mask(tuple(x.shape), p, seed, x.device).to(x.dtype) / (1.0 - p)
    return x * mask


def scaled_lora_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Unfused scaled LoRA: ``base(x) + cat_j(B_j(A_j(drop(x)))) * scale`` with the scale one per segment (each
    segment's outputs times its scale) or one per output channel; shapes as ``metapeft.ops.scaled_lora``.

    x (..., K), weight (N, K), bias (N,) or None, lora_A (S*r, K), lora_B (N, r), scale (S,) or (N,).
    """
    segments = lora_A.shape[0] // lora_B.shape[1]
    result = F.linear(x, weight, bias)
    dropped = reference_dropout(x, dropout_p, seed)
    a_blocks = lora_A.chunk(segments, dim=0)
    b_blocks = lora_B.chunk(segments, dim=0)
    lora = torch.cat([F.linear(F.linear(dropped, a), b) for a, b in zip(a_blocks, b_blocks)], dim=-1)
    per_channel = scale.to(x.dtype).repeat_interleave(weight.shape[0] // scale.shape[0])  # (N,): a segment's scale
    return result + lora * per_channel  # on each of its outputs


def adapter_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: torch.Tensor,
    activation: str = "relu",
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Unfused adapter: ``(x if residual is None else residual) + scale * up(act(down(drop(x))))``.

    Shapes as ``metapeft.ops.adapter``: x (..., D), residual (..., D) or None, down_weight (b, D), down_bias (b,)
    or None, up_weight (D, b), up_bias (D,) or None, scale (1,); ``activation`` "relu" or "gelu" (exact).
    """
    hidden = F.linear(reference_dropout(x, dropout_p, seed), down_weight, down_bias)
    hidden = F.relu(hidden) if activation == "relu" else F.gelu(hidden)
    delta = F.linear(hidden, up_weight, up_bias) * scale.to(x.dtype)
    return (x if residual is None else residual) + delta


class ReferenceMetaLoRA(nn.Module):
    """The unfused LoRA with a learnable per-segment (or per-output-channel) modulator: the tests' brute-force twin
    of ``FusedMetaLoRA``.

    x (..., K) -> (..., N); parameters ``lora_A`` (S*r, K), ``lora_B`` (N, r) (zeros), ``modulator`` (S,) (or (N,)
    with ``gamma="channel"``) with gamma = softplus(modulator) = 1 at init.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, segments: int = 1,
                 gamma: str = "scalar") -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.lora_A = nn.Parameter(torch.randn(segments * rank, base.in_features) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        count = base.out_features if gamma == "channel" else segments
        self.modulator = nn.Parameter(torch.full((count,), modulator_for_gamma(1.0, "softplus")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.nn.functional.softplus(self.modulator) * (self.alpha / self.rank)
        return scaled_lora_reference(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, scale)


class ReferenceMetaAdapter(nn.Module):
    """:func:`adapter_reference` with ``FusedMetaAdapter``'s parameter names and shapes (softplus modulator (1,) or
    (D,));
    x and residual (..., D) -> (..., D). Built from a ``FusedMetaAdapter`` (its hyperparameters, fresh weights)."""

    def __init__(self, layer: FusedMetaAdapter) -> None:
        super().__init__()
        self.alpha, self.activation = layer.alpha, layer.activation
        for name in (*layer.peft_parameter_names, "modulator"):
            setattr(self, name, nn.Parameter(torch.empty_like(getattr(layer, name))))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        scale = F.softplus(self.modulator) * self.alpha
        return adapter_reference(x, residual, self.down_weight, self.down_bias, self.up_weight, self.up_bias, scale,
                                 self.activation)


def reference_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose ``FusedMetaLoRA`` / ``FusedMetaAdapter`` layers are :class:`ReferenceMetaLoRA`
    / :class:`ReferenceMetaAdapter` (same parameter names; values come from ``functional_call``).

    Raises ValueError for a layer the reference does not express (constraint other than softplus, inactive
    segments, dropout in training mode).
    """
    twin = copy.deepcopy(model)
    for name, layer in list(twin.named_modules()):
        if not isinstance(layer, (FusedMetaLoRA, FusedMetaAdapter)):
            continue
        if layer.constraint != "softplus" or (layer.training and layer.dropout > 0.0):
            raise ValueError(f"reference_twin: layer {name!r} needs constraint='softplus' and no active dropout")
        if isinstance(layer, FusedMetaAdapter):
            twin.set_submodule(name, ReferenceMetaAdapter(layer))
        elif len(layer.active_segments) != layer.segments:
            raise ValueError(f"reference_twin: layer {name!r} has inactive segments {layer.active_segments}")
        else:
            twin.set_submodule(name, ReferenceMetaLoRA(layer.base, layer.rank, layer.alpha, layer.segments,
                                                       layer.granularity))
    return twin


def _adamw_start(phi: dict[str, torch.Tensor], state) -> dict[str, tuple]:
    state = [None] * len(phi) if state is None else state
    return {n: (torch.zeros_like(p), torch.zeros_like(p), 0) if s is None else tuple(s)
            for (n, p), s in zip(phi.items(), state, strict=True)}


def _adamw_step(phi, g, moments, scales, lr, weight_decay, adamw):
    """One AdamW step of every phi tensor, written from the formula (not from metapeft.meta.inner)."""
    (b1, b2), eps = adamw["betas"], adamw.get("eps", 1e-8)
    new_phi, new_moments = {}, {}
    for n, p in phi.items():
        m, v, t = moments[n]
        t = t + 1
        m = b1 * m + (1 - b1) * g[n]
        v = b2 * v + (1 - b2) * g[n] ** 2
        direction = weight_decay * p + (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + eps)
        new_phi[n] = p - lr * scales.get(n, 1.0) * direction
        new_moments[n] = (m, v, t)
    return new_phi, new_moments


@dataclass
class BruteForceHypergradient:
    """The oracle's meta step: ``meta_grads`` in ``meta_parameters(model)`` order, ``lookahead`` (phi_K) and
    ``phi_grads`` (g_0 = grad_phi L_train(phi, rho) on ``train_batch``) in ``trainable_phi(model)`` order; detached."""

    meta_grads: list[torch.Tensor]
    lookahead: list[torch.Tensor]
    phi_grads: list[torch.Tensor]


def brute_force_hypergradient(
    model: nn.Module,
    loss_fn: Callable[[Callable[..., Any], Any], torch.Tensor],
    train_batch: Any,
    val_batch: Any,
    *,
    lr: float,
    momentum: float = 0.0,
    momentum_buffers: Sequence[torch.Tensor] | None = None,
    weight_decay: float = 0.0,
    lookahead_batches: Sequence[Any] = (),
    first_order: bool = False,
    twin: nn.Module | None = None,
    lr_scales: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    adamw: dict[str, Any] | None = None,
    max_grad_norm: float | None = None,
) -> BruteForceHypergradient:
    """``d/d rho L_val(phi_K(rho), rho)`` by ``torch.func``, unrolling K = 1 + len(lookahead_batches) SGD steps as
    ``torch.optim.SGD`` takes them (dampening 0): ``m_k = g_k + wd * phi_k + mu * m_{k-1}``,
    ``phi_{k+1} = phi_k - lr * m_k``, with g_k = grad_phi L_train(phi_k, rho) on train_batch, lookahead_batches...

    Exact: ``torch.func.grad`` of the validation loss at phi_K through every inner ``torch.func.grad`` (second
    order). ``first_order=True``: every g_k held fixed (no second derivative of L_train). ``lr_scales``: module-wise
    learning rates, a function of the modulator values (``{name: rho}``) returning ``{phi name: D}``; the steps
    are then ``phi_{k+1} = phi_k - lr * D * m_k`` and D is differentiated too. ``loss_fn(model_callable, batch) -> 0-d
    tensor`` gets a callable running the twin on the parameter values. ``twin`` (default :func:`reference_twin`)
    must have ``model``'s parameter names; it runs with double-differentiable attention
    (:func:`metapeft.meta.math_attention`). ``momentum_buffers``: m_{-1}, one tensor per ``trainable_phi(model)``
    entry (zeros when None).

    ``adamw``: unroll torch's AdamW steps instead (``lr``, ``weight_decay`` as above; momentum unused), from
    ``{"betas": (b1, b2), "eps": eps, "state": [(exp_avg, exp_avg_sq, steps taken) or None per phi tensor]}``
    (state optional): ``t += 1; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    phi = phi - lr * D * (wd * phi + (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps))``.

    ``max_grad_norm``: each g_k is first clipped as ``torch.nn.utils.clip_grad_norm_`` clips it,
    ``g * min(1, max_grad_norm / (||g|| + 1e-6))`` with ||g|| the 2-norm over every phi tensor (differentiated too).
    """
    twin = reference_twin(model) if twin is None else twin
    phi_ids = {id(p) for p in trainable_phi(model)}
    rho_ids = {id(p) for p in meta_parameters(model)}
    named = dict(model.named_parameters())
    phi = {n: p.detach() for n, p in named.items() if id(p) in phi_ids}
    rho = {n: p.detach() for n, p in named.items() if id(p) in rho_ids}
    frozen = {n: p.detach() for n, p in named.items() if id(p) not in phi_ids | rho_ids}
    frozen.update(dict(model.named_buffers()))
    buffers = [torch.zeros_like(p) for p in phi.values()] if momentum_buffers is None else momentum_buffers
    start_buffers = dict(zip(phi, buffers, strict=True))

    def loss(phi_, rho_, batch):
        return loss_fn(lambda *inputs: functional_call(twin, {**frozen, **phi_, **rho_}, inputs), batch)

    def lookahead(rho_):
        phi_k, m, first_grad = phi, start_buffers, None
        moments = None if adamw is None else _adamw_start(phi, adamw.get("state"))
        scales = {} if lr_scales is None else lr_scales(rho_)
        for batch in (train_batch, *lookahead_batches):
            g = torch.func.grad(loss)(phi_k, rho_, batch)
            if first_order:
                g = {n: t.detach() for n, t in g.items()}
            first_grad = g if first_grad is None else first_grad
            if max_grad_norm is not None:
                norm = torch.sqrt(sum((t * t).sum() for t in g.values()))
                g = {n: t * torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) for n, t in g.items()}
            if adamw is None:
                m = {n: g[n] + weight_decay * phi_k[n] + momentum * m[n] for n in phi}
                phi_k = {n: phi_k[n] - lr * scales.get(n, 1.0) * m[n] for n in phi}
            else:
                phi_k, moments = _adamw_step(phi_k, g, moments, scales, lr, weight_decay, adamw)
        return phi_k, first_grad

    def val_at_lookahead(rho_):
        phi_k, first_grad = lookahead(rho_)
        return loss(phi_k, rho_, val_batch), (phi_k, first_grad)

    with math_attention(twin):
        meta_grads, (phi_k, first_grad) = torch.func.grad(val_at_lookahead, has_aux=True)(rho)
    return BruteForceHypergradient([meta_grads[n].detach() for n in rho], [phi_k[n].detach() for n in phi],
                                   [first_grad[n].detach() for n in phi])
