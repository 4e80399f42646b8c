"""The ``torch`` backend's dropout rule and inverted dropout from a rule's factors: masks regenerated, never stored.

The seed is an int64 scalar tensor on x's device (layers draw it there from torch's generator, so a compiled or
graph-captured step draws a fresh one each step without a host sync), or None when p == 0.
A backend's dropout rule ``dropout(x (M, K), p, seed)`` returns the factors its kernels apply to x (1/(1-p) where
kept, 0 elsewhere); it is registered with the backend's launchers (``metapeft.ops.backends.OpImpl``). The torch
rule draws the mask from a ``torch.Generator`` seeded with ``seed``; the Triton kernels draw theirs from Philox
and ``metapeft._C`` from a hash of (seed, index): masks are reproducible within a backend, not across backends.
"""

from __future__ import annotations

import torch


def dropout_keep_mask(shape: tuple[int, ...], p: float, seed: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """Bool keep-mask of ``shape``: each element is kept with probability ``1 - p``, reproducibly from ``seed`` (an
    int, or an int64 scalar tensor, read on the host: free for CPU tensors, one sync for a CUDA seed)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return torch.rand(shape, generator=generator, device=device) >= p


def torch_dropout_factors(x: torch.Tensor, p: float, seed: torch.Tensor | int) -> torch.Tensor:
    """The ``torch`` backend's dropout factors for ``x``'s shape: 1/(1-p) where kept, 0 elsewhere (x's dtype)."""
    return dropout_keep_mask(tuple(x.shape), p, seed, x.device).to(x.dtype) * (1.0 / (1.0 - p))


def seeded_dropout(x: torch.Tensor, p: float, seed: torch.Tensor | int | None, factors=torch_dropout_factors
                   ) -> torch.Tensor:
    """Inverted dropout of ``x`` (any shape, float dtype), differentiable in x; ``p == 0`` returns ``x``.

    ``factors(x, p, seed)`` is a backend's dropout rule (the torch backend's by default), so that a
    differentiable recomputation matches that backend's kernels.
    """
    if p == 0.0:
        return x
    return x * factors(x, p, seed).to(x.dtype)


def device_seed(seed: torch.Tensor | int, p: float, x: torch.Tensor) -> torch.Tensor | None:
    """The seed an op takes: None when ``p == 0``, else an int64 scalar tensor on x's device (an int is copied)."""
    if p == 0.0:
        return None
    if isinstance(seed, torch.Tensor):
        return seed.to(device=x.device, dtype=torch.int64).reshape(())
    return torch.tensor(seed, dtype=torch.int64, device=x.device)
