"""Sums over the ranks of a ``torch.distributed`` process group, as the meta step needs them.

A *reduction* is a callable ``reduce(tensors) -> tensors`` that returns, for a list of tensors, their sums
over all ranks (same shapes and dtypes, new tensors). :func:`rank_sum` is the one built on a process group;
a caller may pass its own (e.g. one that counts the bytes it moves).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

Reduction = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def rank_sum(tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Sum ``tensors`` over the ranks of ``group`` (default: the world), one flat all-reduce per dtype.

    tensors: any shapes, on the device the backend reduces on (CPU for gloo, CUDA for nccl).
    Returns new tensors of the same shapes and dtypes; the inputs are not modified."""
    sums: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        members = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in members])
        dist.all_reduce(flat, group=group)
        for i, piece in zip(members, flat.split([tensors[i].numel() for i in members])):
            sums[i] = piece.view_as(tensors[i])
    return sums


def as_reduction(reduce: dist.ProcessGroup | Reduction | None) -> Reduction | None:
    """``reduce`` as a reduction callable: a process group becomes :func:`rank_sum` over it; a callable is
    kept; None (a single process) stays None."""
    if isinstance(reduce, dist.ProcessGroup):
        return lambda tensors: rank_sum(tensors, reduce)
    if reduce is None or callable(reduce):
        return reduce
    raise TypeError(f"reduce must be a torch.distributed.ProcessGroup, a callable or None, got {type(reduce).__name__}")
