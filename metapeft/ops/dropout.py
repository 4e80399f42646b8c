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


def seeded_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout of ``x`` (any shape, float dtype) with the mask from ``seed``; ``p == 0`` returns ``x``."""
    if p == 0.0:
        return x
    keep = dropout_keep_mask(tuple(x.shape), p, seed, x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
