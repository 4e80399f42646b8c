"""Seeded dropout masks for the ``torch`` backend and the reference: regenerated, never stored.

The ``torch`` backend never saves a dropout mask for backward: it saves the seed and regenerates the
identical mask from a ``torch.Generator`` seeded with it. (The Triton kernels draw their masks from
Philox with the same seed; masks are reproducible within a backend, not across backends.)
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


_BACKEND_FACTORS = {"torch": torch_dropout_factors}


def register_dropout_factors(backend: str, factors) -> None:
    """Declare ``backend``'s dropout mask: ``factors(x (M, K), p, seed) -> (M, K)`` tensor, 1/(1-p) where its
    kernels keep an element and 0 elsewhere. The differentiable paths (double backward, forward-mode AD)
    of every op use it to reproduce that backend's forward exactly."""
    _BACKEND_FACTORS[backend] = factors


def backend_dropout_factors(backend: str):
    """The dropout-factor function registered for ``backend``."""
    return _BACKEND_FACTORS[backend]


def seeded_dropout(x: torch.Tensor, p: float, seed: int, factors=torch_dropout_factors) -> torch.Tensor:
    """Inverted dropout of ``x`` (any shape, float dtype), differentiable in x; ``p == 0`` returns ``x``.

    ``factors(x, p, seed)`` gives the mask scaled by 1/(1-p): the torch backend's by default, or another
    backend's so that a composite recomputation matches that backend's kernels.
    """
    if p == 0.0:
        return x
    return x * factors(x, p, seed).to(x.dtype)
