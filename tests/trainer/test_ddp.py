"""2-process gloo DDP training equals single-process training on the same global batches (float64)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metapeft.trainer import MetaPEFTTrainer, TrainerConfig, setup_distributed
from tests.helpers.toy import LongTailedBlobs, TinyNet

COUNTS = [20, 12, 6, 4]


def config(**kwargs) -> TrainerConfig:
    # odd global and meta batch sizes give uneven shards; meta_interval=2 mixes meta and plain steps
    return TrainerConfig(epochs=2, batch_size=15, meta_batch_size=9, meta_interval=2, meta_lr=0.05,
                         progress=False, **kwargs)


def train(**kwargs):
    torch.manual_seed(0)
    trainer = MetaPEFTTrainer(TinyNet(dtype=torch.float64), LongTailedBlobs(COUNTS), config=config(**kwargs))
    metrics = trainer.fit(eval_set=LongTailedBlobs(COUNTS, seed=5))
    return trainer, metrics


def worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))  # what torchrun sets
    torch.set_num_threads(1)
    assert setup_distributed() == (rank, world_size)
    try:
        torch.manual_seed(rank)  # different inits: the trainer must broadcast rank 0's model
        trainer, metrics = train()
        states = [None] * world_size
        dist.all_gather_object(states, trainer.model_state())
        if rank == 0:
            torch.save({"states": states, "metrics": metrics, "outer_step": trainer.outer_step}, out_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process(tmp_path):
    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(worker, args=(2, free_port(), out_path), nprocs=2, join=True)
    result = torch.load(out_path, weights_only=True)
    single, metrics = train()
    assert result["outer_step"] == single.outer_step == 3
    for name, expected in single.model_state().items():
        for rank, state in enumerate(result["states"]):
            assert torch.allclose(state[name], expected, rtol=1e-10, atol=1e-12), (rank, name)
    assert result["metrics"]["accuracy"] == metrics["accuracy"]
    assert result["metrics"]["macro_f1"] == metrics["macro_f1"]
