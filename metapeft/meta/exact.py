"""The exact hypergradient mode: every R_k c_k (and H_k c_k) as ONE reverse-over-reverse product over the train
gradient's graph, which the look-ahead kept (``create_graph=True``; fused ops record a differentiable backward,
:func:`metapeft.ops.double_backward_ahead`, and attention runs on the math path,
:func:`metapeft.meta.math_attention`): ``autograd.grad(g_k, (rho, phi_k), grad_outputs=c_k)`` differentiates
``g_k . c_k``. Memory grows linearly in K (module docstring of :mod:`metapeft.meta.hypergradient`)."""

from __future__ import annotations

import torch

from metapeft.meta.lookahead import Mode, Problem, Step, grads_or_zeros, zero_products


def exact_products(problem: Problem, step: Step, k: int, c: list[torch.Tensor], with_phi: bool) -> list[torch.Tensor]:
    """(R_k c, and H_k c when ``with_phi``) of this rank's shard: one reverse pass over g_k's graph, which is
    released afterwards."""
    inputs = problem.rho + (step.inputs if with_phi else [])
    pairs = [(g, w) for g, w in zip(step.local_grads, c) if g.requires_grad]
    step.local_grads = []
    if not pairs:
        return zero_products(problem, c, with_phi)
    return grads_or_zeros([g for g, _ in pairs], inputs, grad_outputs=[w for _, w in pairs])


EXACT = Mode("exact", create_graph=True, replay_rng=False, reduces_products=True, products=exact_products)
