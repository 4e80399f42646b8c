"""The first-order hypergradient mode (what the authors' code computes): the direct term grad_rho L_val(phi_K, rho)
only, the reverse recursion run with R_k = H_k = 0. With module-wise learning rates the recursion still yields
the learning-rate term (no second derivative of the loss): it is what makes the modulator a learning rate even
without second derivatives."""

from __future__ import annotations

import torch

from metapeft.meta.lookahead import Mode, Problem, Step, zero_products


def first_order_products(problem: Problem, step: Step, k: int, c: list[torch.Tensor],
                         with_phi: bool) -> list[torch.Tensor]:
    """R_k c = 0 and H_k c = 0: no pass at all."""
    return zero_products(problem, c, with_phi)


FIRST_ORDER = Mode("first_order", create_graph=False, replay_rng=False, reduces_products=False,
                   products=first_order_products)
