"""The ``torch`` backend's dropout rule and inverted dropout from a rule's factors: masks regenerated, never stored.

The seed is an int64 scalar tensor on x's device (layers draw it there from torch's generator, so a compiled or
graph-captured step draws a fresh one each step without a host sync), or None when p == 0.
A backend's dropout rule ``dropout(x (M, K), p, seed)`` returns the factors its kernels apply to x (1/(1-p) where
kept, 0 elsewhere); it is registered with the backend's launchers (``metapeft.ops.backends.OpImpl``). The torch
rule draws the mask from a ``torch.Generator`` seeded with ``seed``; the Triton kernels draw theirs from Philox
and ``metapeft._C`` from a hash of (seed, index): masks are reproducible within a backend, not across backends.
Under ``torch.func.vmap(..., randomness="different")`` every sample has its own seed, which no generator can take:
the torch rule then hashes (seed, element index) on the device (:func:`hashed_keep_mask`).
"""

from __future__ import annotations

import torch
from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor

_LOW32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, factor: int) -> torch.Tensor:
    """``h * factor mod 2**32`` for int64 ``h`` in [0, 2**32) and a 32-bit ``factor``, without int64 overflow."""
    return ((h & 0xFFFF) * factor + ((((h >> 16) * factor) & 0xFFFF) << 16)) & _LOW32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of [0, 2**32) with full avalanche) on int64 tensors."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def per_sample_seed(seed: torch.Tensor | int) -> bool:
    """Whether ``seed`` holds one value per sample: a tensor batched by ``vmap(randomness="different")`` at some level
    of torch.func's wrappers (``vmap(grad(f))`` wraps the batched seed for the gradient)."""
    while isinstance(seed, torch.Tensor) and is_functorch_wrapped_tensor(seed):
        if is_batchedtensor(seed):
            return True
        seed = get_unwrapped(seed)
    return False


def hashed_keep_mask(shape: tuple[int, ...], p: float, seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Bool keep-mask of ``shape`` from a hash of (``seed``, element index), tensor operations only (no host read,
    so it runs under ``vmap`` with a per-sample seed): element i is kept when ``mix(mix(i ^ k1) ^ k2) >= p * 2**32``,
    with keys ``k1``, ``k2`` mixed from the seed's two 32-bit halves."""
    seed = seed.to(device=device, dtype=torch.int64)
    key1 = _mix32(((seed >> 32) & _LOW32) ^ 0x9E3779B9)
    key2 = _mix32((seed & _LOW32) ^ key1)
    index = torch.arange(torch.Size(shape).numel(), dtype=torch.int64, device=device)
    return (_mix32(_mix32(index ^ key1) ^ key2) >= int(p * 2**32)).reshape(shape)


def dropout_keep_mask(shape: tuple[int, ...], p: float, seed: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """Bool keep-mask of ``shape``: each element is kept with probability ``1 - p``, reproducibly from ``seed`` (an
    int, or an int64 scalar tensor, read on the host: free for CPU tensors, one sync for a CUDA seed; a per-sample
    seed under ``vmap(randomness="different")`` goes to :func:`hashed_keep_mask`)."""
    if per_sample_seed(seed):
        return hashed_keep_mask(shape, p, seed, device)
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
