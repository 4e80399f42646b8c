"""Run a function in several CPU processes joined in a gloo process group, as torchrun would start them."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# a rank that waits longer than this on a collective fails instead of hanging the test suite
GROUP_TIMEOUT = datetime.timedelta(seconds=120)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))  # what torchrun sets
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable, world_size: int, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes (one thread each) inside an
    initialised gloo default group; re-raises the first worker's exception. ``fn`` must be importable (a
    module-level function)."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def gloo_results(fn: Callable, world_size: int, out_dir) -> list[dict]:
    """Run ``fn(rank, world_size, str(out_dir))`` under :func:`run_gloo`; each rank saves its results to
    ``out_dir/rank{rank}.pt``, returned in rank order (loaded with ``weights_only=True``)."""
    run_gloo(fn, world_size, str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def assert_states_equal(actual: dict, expected: dict, label) -> None:
    """Two float64 state dicts equal up to the order of the ranks' sums (rtol 1e-10, atol 1e-12)."""
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, rtol=1e-10, atol=1e-12), (label, name)
