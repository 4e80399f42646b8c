"""The ``torch`` backend's dropout rule and inverted dropout from a rule's factors: masks regenerated, never stored.

A backend's dropout rule ``dropout(x (M, K), p, seed)`` returns the factors its kernels apply to x (1/(1-p) where
kept, 0 elsewhere); it is registered with the backend's launchers (``metapeft.ops.backends.OpImpl``). The torch
rule draws the mask from a ``torch.Generator`` seeded with ``seed``; the Triton kernels draw theirs from Philox
and ``metapeft._C`` from a hash of (seed, index): masks are reproducible within a backend, not across backends.
"""

from __future__ import annotations

import torch


def dropout_keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Bool keep-mask of ``shape``: each element is kept with probability ``1 - p``, reproducibly from ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) >= p


def torch_dropout_factors(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The ``torch`` backend's dropout factors for ``x``'s shape: 1/(1-p) where kept, 0 elsewhere (x's dtype)."""
    return dropout_keep_mask(tuple(x.shape), p, seed, x.device).to(x.dtype) * (1.0 / (1.0 - p))


def seeded_dropout(x: torch.Tensor, p: float, seed: int, factors=torch_dropout_factors) -> torch.Tensor:
    """Inverted dropout of ``x`` (any shape, float dtype), differentiable in x; ``p == 0`` returns ``x``.

    ``factors(x, p, seed)`` is a backend's dropout rule (the torch backend's by default), so that a
    differentiable recomputation matches that backend's kernels.
    """
    if p == 0.0:
        return x
    return x * factors(x, p, seed).to(x.dtype)
