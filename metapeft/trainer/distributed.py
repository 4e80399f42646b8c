"""torch.distributed plumbing of the trainer: joining torchrun's process group, summing over ranks, agreeing on a flag.

Every rank sees the same global batch order; each works on its contiguous shard
(:func:`metapeft.sampling.shard_bounds`) and the pieces are summed with one flat all-reduce.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def setup_distributed(backend: str = "auto") -> tuple[int, int]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``) when ``WORLD_SIZE > 1`` and no group exists yet: ``"auto"`` picks nccl
    (and device ``cuda:LOCAL_RANK``) with CUDA, gloo without. Returns (rank, world_size); (0, 1) alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(("nccl" if torch.cuda.is_available() else "gloo") if backend == "auto" else backend)
    return rank_and_world_size()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensors: list[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """Sum ``tensors`` (any shapes, one dtype) over ranks in one flat all-reduce; the inputs themselves on a single
    process."""
    if world_size == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def any_rank(flag: bool, device: torch.device, world_size: int) -> bool:
    """Whether ``flag`` is true on any rank (one tiny all-reduce; ``flag`` itself on a single process)."""
    if world_size == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(world_size: int) -> None:
    """Wait until every rank gets here (nothing on a single process)."""
    if world_size > 1:
        dist.barrier()


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module, world_size: int) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's (identical starting points)."""
    if world_size == 1:
        return
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)
