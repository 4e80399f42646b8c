"""Per-rank cost of one sharded meta step with 1 and 2 gloo processes (one thread each), and what it all-reduces.

Run (two CPU processes, one thread each):
``OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_meta_step_ddp.py``
(``--quick``: a smaller ViT, for a smoke run; ``--lookahead-steps K``; ``--reps N``).

Model: timm ``vit_tiny_patch16_224`` (pretrained=False) at 64 px in 8 px patches (65 tokens, dim 192, 4 blocks),
fp32, LoRA r = 8 on qkv (S = 3), proj, fc1 and fc2 of every block, trainable head, 10 classes; global train and
meta batches of 32; SGD look-ahead with momentum 0.9 and weight decay 5e-4.

The two processes form one gloo group and alternate rounds, so a shared machine slows both alike:
- world 2: both ranks call ``hypergradient(..., reduce=...)`` on their half of each global batch;
- world 1: rank 0 calls it on the whole batches without a reduction while rank 1 waits in a barrier.
Per call: wall time, process CPU time, and the wall time spent inside the all-reduces (transfer plus waiting
for the other rank); compute = wall - all-reduce time. World 2 reports the slower rank of each round. Volume:
the bytes a rank hands to all-reduce per meta step (a ring all-reduce sends and receives 2 (W - 1) / W of it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metapeft  # noqa: E402
from benchmarks.harness import record_results  # noqa: E402
from metapeft.data.sampling import shard_bounds  # noqa: E402
from metapeft.meta import hypergradient, rank_sum, trainable_phi  # noqa: E402

RANK, BATCH, CLASSES, LR, MOMENTUM, WEIGHT_DECAY = 8, 32, 10, 0.01, 0.9, 5e-4
FULL = {"img_size": 64, "patch_size": 8, "depth": 4}
QUICK = {"img_size": 32, "patch_size": 8, "depth": 2}


class TimedSum:
    """:func:`metapeft.meta.rank_sum` that records its wall time, calls and payload bytes."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.bytes = 0.0, 0, 0

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        start = time.perf_counter()
        sums = rank_sum(tensors)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return sums


def build(shape: dict, steps: int):
    """Model, K global train batches, a global meta batch and momentum buffers (the same on every rank)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, **shape)
    metapeft.inject(model, method="lora", rank=RANK)  # q, k, v (one qkv module, S = 3), out, mlp1, mlp2; head trainable
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02)  # nonzero B: the modulators' gradients and every second-order term are nonzero
    size = shape["img_size"]

    def batch():
        return torch.randn(BATCH, 3, size, size), torch.randint(0, CLASSES, (BATCH,))

    train = [batch() for _ in range(steps)]
    buffers = [torch.randn_like(p) * 1e-3 for p in trainable_phi(model)]
    return model.train(), train, batch(), buffers


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def timed_call(model, train, val, buffers, mode: str, reduce: TimedSum | None) -> dict:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    hypergradient(model, classification_loss, train[0], val, lr=LR, momentum=MOMENTUM, momentum_buffers=buffers,
                  weight_decay=WEIGHT_DECAY, mode=mode, lookahead_batches=train[1:], reduce=reduce)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    comm = 0.0 if reduce is None else reduce.seconds
    return {"wall": wall, "cpu": cpu, "comm": comm, "compute": wall - comm}


def measure(mode: str, model, train, val, buffers, rank: int, reps: int) -> dict | None:
    """Interleaved world-1 and world-2 rounds; returns medians on rank 0 (None elsewhere)."""
    shard = [(x[slice(*shard_bounds(BATCH, rank, 2))], y[slice(*shard_bounds(BATCH, rank, 2))]) for x, y in train]
    val_shard = tuple(t[slice(*shard_bounds(BATCH, rank, 2))] for t in val)
    one, two, volume = [], [], None
    for _ in range(reps + 1):  # round 0 warms up
        dist.barrier()
        reduce = TimedSum()
        two.append(timed_call(model, shard, val_shard, buffers, mode, reduce))
        volume = (reduce.calls, reduce.bytes)
        dist.barrier()
        if rank == 0:
            one.append(timed_call(model, train, val, buffers, mode, None))
        dist.barrier()
    rounds = [None, None]
    dist.all_gather_object(rounds, two[1:])
    if rank != 0:
        return None
    slowest = [max(pair, key=lambda r: r["wall"]) for pair in zip(*rounds)]
    one = one[1:]

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    return {
        "mode": mode, "lookahead_steps": len(train),
        "world1_wall_s": median(one, "wall"), "world2_wall_s": median(slowest, "wall"),
        "world2_allreduce_s": median(slowest, "comm"),
        "compute ratio (2 / 1)": median(slowest, "compute") / median(one, "compute"),
        "wall ratio (2 / 1)": median(slowest, "wall") / median(one, "wall"),
        "cpu ratio (2 / 1)": median(slowest, "cpu") / median(one, "cpu"),
        "allreduces per step": volume[0], "allreduce KiB per step": volume[1] / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 32 px, 2-block ViT: a smoke run")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per mode (default 5)")
    parser.add_argument("--lookahead-steps", type=int, default=1, help="look-ahead steps K (default 1)")
    parser.add_argument("--modes", nargs="+", default=list(metapeft.meta.MODES), choices=metapeft.meta.MODES)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if dist.get_world_size() != 2:
        raise SystemExit("run under torchrun with --nproc_per_node 2")
    shape = QUICK if args.quick else FULL
    model, train, val, buffers = build(shape, args.lookahead_steps)
    rows = [measure(mode, model, train, val, buffers, rank, args.reps) for mode in args.modes]
    dist.destroy_process_group()
    if rank != 0:
        return
    for row in rows:
        print(row)
    name = "meta_step_ddp" + ("_quick" if args.quick else "")
    options = (" --quick" if args.quick else "") + (f" --reps {args.reps}" if args.reps != 5 else "") + (
        f" --lookahead-steps {args.lookahead_steps}" if args.lookahead_steps != 1 else "")
    record_results(
        name, rows,
        f"Sharded meta step, 1 vs 2 gloo processes (1 thread each): ViT-Ti ({shape['img_size']} px, "
        f"{shape['depth']} blocks), batch {BATCH} + meta batch {BATCH}, LoRA r={RANK}",
        command="OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_meta_step_ddp.py"
        + options,
    )


if __name__ == "__main__":
    main()
