"""torch.distributed plumbing of the trainer: joining torchrun's process group, summing over ranks, agreeing on a flag.

Every rank sees the same global batch order; each works on its contiguous shard
(:func:`metapeft.data.sampling.shard_bounds`) and the pieces are summed with one flat all-reduce.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from metapeft.meta import rank_sum


def setup_distributed(backend: str = "auto", timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``) when ``WORLD_SIZE > 1`` and no group exists yet: ``"auto"`` picks nccl
    (and device ``cuda:LOCAL_RANK``) with CUDA, gloo without. Returns (rank, world_size); (0, 1) alone.

    ``timeout_s``: how long a collective waits for the other ranks before it raises. A rank that dies mid-run
    ends the others with an error: under gloo at once (its connections close), under nccl after the timeout."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(("nccl" if torch.cuda.is_available() else "gloo") if backend == "auto" else backend,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return rank_and_world_size()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensors: list[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """Sum ``tensors`` (any shapes) over ranks, one flat all-reduce per dtype (:func:`metapeft.meta.rank_sum`);
    the inputs themselves on a single process."""
    return tensors if world_size == 1 else rank_sum(tensors)


def check_ranks_agree(facts: dict[str, object], world_size: int) -> None:
    """Raise the same ``ValueError`` on every rank when any rank's ``facts`` (name -> a picklable value that must
    be equal everywhere: config fields, dataset sizes, model structure) differ from the others', naming each
    differing fact with every rank's value; one ``all_gather_object``, before any collective that would hang on
    the difference."""
    if world_size == 1:
        return
    gathered: list[dict | None] = [None] * world_size
    dist.all_gather_object(gathered, facts)
    names = list(dict.fromkeys(name for rank_facts in gathered for name in rank_facts))
    differing = [name for name in names if any(f.get(name) != gathered[0].get(name) for f in gathered)]
    if differing:
        details = "; ".join(f"{name}: " + ", ".join(f"rank {r} {f.get(name)!r}" for r, f in enumerate(gathered))
                            for name in differing)
        raise ValueError(f"the ranks disagree on {', '.join(differing)} ({details}): every rank must run the same "
                         "config on the same data and model")


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
