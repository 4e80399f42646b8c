"""The finite-difference hypergradient mode (DARTS): R_k c_k (and H_k c_k) as the central difference
``(grad L_train(phi_k + eps c_k) - grad L_train(phi_k - eps c_k)) / (2 eps)``, with ``eps = fd_epsilon`` or, by
default, ``FD_RADIUS / ||c_k||`` (a parameter-space step of norm 0.01, DARTS' choice; the error is O(eps^2)). At
k = 0 the two passes differentiate with respect to rho only, phi frozen, so every fused backward skips its dA / dB
(and head) GEMMs. Both passes replay step k's random numbers (dropout masks): the difference is taken on the same
stochastic loss."""

from __future__ import annotations

import torch

from metapeft.meta.lookahead import Mode, Problem, Step, grads_or_zeros, parameters_replaced, zero_products

FD_RADIUS = 0.01


def finite_difference_products(problem: Problem, step: Step, k: int, c: list[torch.Tensor],
                               with_phi: bool) -> list[torch.Tensor]:
    """(grad L_train(phi_k + eps c) - grad L_train(phi_k - eps c)) / (2 eps) with respect to rho (and phi_k when
    ``with_phi``; otherwise phi is frozen in both passes), on this rank's shard with step k's random numbers."""
    if step.empty:
        return zero_products(problem, c, with_phi)
    if problem.fd_epsilon is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.float()) for w in c]))
        # c = 0 makes the term exactly 0 with any finite eps; clamping keeps eps finite (no host sync to check)
        eps = FD_RADIUS / norm.clamp_min(torch.finfo(torch.float32).tiny)
    else:
        eps = torch.tensor(float(problem.fd_epsilon), device=c[0].device)
    passes = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            shifted = [p + (sign * eps).to(p.dtype) * w for p, w in zip(step.values, c)]
        with problem.rng.replay(k), parameters_replaced(problem.model, problem.phi, shifted,
                                                        requires_grad=with_phi) as leaves:
            passes.append(grads_or_zeros(step.weighted_loss(problem.loss_fn, problem.model),
                                         problem.rho + (leaves if with_phi else [])))
    return [(plus - minus) / (2 * eps).to(plus.dtype) for plus, minus in zip(*passes)]


FINITE_DIFFERENCE = Mode("finite_difference", create_graph=False, replay_rng=True, reduces_products=True,
                         products=finite_difference_products)
