"""The sharded hypergradient under 2 and 3 gloo processes equals the single-process hypergradient on the global
batches, in float64: every mode, LoRA and adapters, momentum buffers and weight decay, K = 1 and K = 3 look-ahead
steps, uneven shards and an empty one (3 ranks share a 2-sample batch)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import metapeft
from metapeft.data.sampling import shard_bounds
from metapeft.meta import hypergradient, rank_sum
from tests.helpers.distributed import run_gloo
from tests.helpers.meta import adapter_net, classification_loss, lora_mlp, momentum_buffers, relative_error

LR, MOMENTUM, WEIGHT_DECAY = 0.3, 0.9, 0.05
TRAIN_SIZES, VAL_SIZE = (7, 5, 2), 5  # shards 4/3, 3/2, 1/1 on 2 ranks; 3/2/2, 2/2/1, 1/1/0 on 3
CASES = [(kind, mode, steps) for kind in ("lora", "adapters") for mode in metapeft.meta.MODES for steps in (1, 3)]


def problem(kind: str):
    """Model, global train batches (one per step), global val batch and momentum buffers; same on every rank."""
    torch.manual_seed(11)
    model = lora_mlp(3) if kind == "lora" else adapter_net()
    train = [(torch.randn(n, 10, dtype=torch.float64), torch.randint(0, 4, (n,))) for n in TRAIN_SIZES]
    val = (torch.randn(VAL_SIZE, 10, dtype=torch.float64), torch.randint(0, 4, (VAL_SIZE,)))
    return model, train, val, momentum_buffers(model)


def shard(batch, rank: int, world_size: int):
    start, stop = shard_bounds(len(batch[1]), rank, world_size)
    return batch[0][start:stop], batch[1][start:stop]


def compute(kind: str, mode: str, steps: int, rank: int = 0, world_size: int = 1, reduce=None) -> list:
    model, train, val, buffers = problem(kind)
    if reduce is not None:
        train, val = [shard(b, rank, world_size) for b in train], shard(val, rank, world_size)
    result = hypergradient(model, classification_loss, train[0], val, lr=LR, momentum=MOMENTUM,
                           momentum_buffers=buffers, weight_decay=WEIGHT_DECAY, mode=mode,
                           lookahead_batches=train[1:steps], reduce=reduce)
    return [result.meta_grads, result.lookahead, result.phi_grads, [result.train_loss], [result.val_loss]]


class CountingSum:
    """:func:`metapeft.meta.rank_sum` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tensors):
        self.calls += 1
        return rank_sum(tensors)


def worker(rank: int, world_size: int, out_path: str) -> None:
    results, calls = {}, {}
    for case in CASES:
        counting_sum = CountingSum()
        results[case] = compute(*case, rank=rank, world_size=world_size, reduce=counting_sum)
        calls[case] = counting_sum.calls
    gathered = [None] * world_size
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save({"results": gathered, "calls": calls}, out_path)


def check_world(world_size: int, tmp_path) -> None:
    out_path = str(tmp_path / f"world{world_size}.pt")
    run_gloo(worker, world_size, out_path)
    saved = torch.load(out_path, weights_only=True)
    for case in CASES:
        kind, mode, steps = case
        # all-reduces: shard sizes, one per look-ahead step, the val pass, one per step k >= 1 and one at the end
        assert saved["calls"][case] == (steps + 2 if mode == "first_order" else 2 * steps + 2), case
        expected = compute(*case)
        for rank, ranks_results in enumerate(saved["results"]):
            for name, actual, oracle in zip(("meta_grads", "lookahead", "phi_grads", "train_loss", "val_loss"),
                                            ranks_results[case], expected):
                # float64; only the order of the sums differs from the single process
                assert relative_error(actual, oracle) < 1e-12, (case, rank, name)


def test_two_processes_equal_single_process(tmp_path):
    check_world(2, tmp_path)


@pytest.mark.slow
def test_three_processes_with_an_empty_shard_equal_single_process(tmp_path):
    check_world(3, tmp_path)
