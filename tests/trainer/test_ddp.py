"""Training under 2 gloo processes (float64): equal to single-process training on the same global batches, with the
sharded meta step (K = 1 exact, K = 2 finite differences); ranks that disagree on data or model fail at start naming
the difference; a checkpoint resumes on another world size (2 -> 1 and 1 -> 2 processes); a rank that dies ends the
other with an error."""

from __future__ import annotations

import os

import pytest
import torch

from metapeft.trainer import Callback, MetaPEFTTrainer, TrainerConfig, setup_distributed
from tests.helpers.distributed import assert_states_equal, gloo_results, run_gloo
from tests.helpers.toy import LongTailedBlobs, TinyNet

COUNTS = [20, 12, 8, 6]  # 46 samples: batches of 15, 15, 15 and 1 (an empty shard on rank 1)
RUNS = {"exact_K1": {"meta_mode": "exact"},
        "finite_difference_K2": {"meta_mode": "finite_difference", "meta_lookahead_steps": 2}}
RESUME_AT = 3


def config(**kwargs) -> TrainerConfig:
    # odd global and meta batch sizes give uneven shards; meta_interval=2 mixes meta and plain steps; no scale
    # warm-up, so the outer steps counted are the schedule's
    return TrainerConfig(**{"epochs": 2, "batch_size": 15, "meta_batch_size": 9, "meta_interval": 2, "meta_lr": 0.05,
                            "progress": False, "meta_warmup_steps": 0, **kwargs})


def trainer_for(counts=COUNTS, model: TinyNet | None = None, **kwargs) -> MetaPEFTTrainer:
    torch.manual_seed(0)
    return MetaPEFTTrainer(model or TinyNet(dtype=torch.float64), LongTailedBlobs(counts), config=config(**kwargs))


def train(**kwargs):
    trainer = trainer_for(**kwargs)
    metrics = trainer.fit(eval_set=LongTailedBlobs(COUNTS, seed=5))
    return trainer, metrics


def disagreement(rank: int, **differing) -> str:
    """The error a 2-rank trainer raises when rank 1 builds it with ``differing`` arguments."""
    try:
        trainer_for(**(differing if rank == 1 else {}))
    except ValueError as error:
        return str(error)
    return "no error"


def worker(rank: int, world_size: int, out_dir: str) -> None:
    assert setup_distributed() == (rank, world_size)
    torch.manual_seed(rank)  # different inits: the trainer must broadcast rank 0's model
    out = {"errors": [disagreement(rank, counts=COUNTS[:-1] + [COUNTS[-1] - 1]),
                      disagreement(rank, model=TinyNet(dtype=torch.float64, meta=False))]}
    for name, kwargs in RUNS.items():
        trainer, metrics = train(**kwargs)
        out[name] = {"state": trainer.model_state(), "metrics": metrics, "outer_step": trainer.outer_step}
    trainer_for(output_dir=os.path.join(out_dir, "two_to_one")).fit(max_steps=RESUME_AT)
    resumed = trainer_for(output_dir=os.path.join(out_dir, "one_to_two"), resume=True)
    resumed.fit()
    out["one_to_two"] = {"state": resumed.model_state(), "outer_step": resumed.outer_step}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The workers' results (one spawn for every check of this module) and the run directory."""
    out_dir = tmp_path_factory.mktemp("ddp")
    trainer_for(output_dir=str(out_dir / "one_to_two")).fit(max_steps=RESUME_AT)
    return gloo_results(worker, 2, out_dir), out_dir


@pytest.mark.parametrize("run", list(RUNS))
def test_two_processes_train_as_one(two_process_run, run):
    results, _ = two_process_run
    single, metrics = train(**RUNS[run])
    assert single.outer_step == 4
    for rank, result in enumerate(results):
        assert result[run]["outer_step"] == single.outer_step
        assert_states_equal(result[run]["state"], single.model_state(), (run, rank))
        assert result[run]["metrics"]["accuracy"] == metrics["accuracy"]
        assert result[run]["metrics"]["macro_f1"] == metrics["macro_f1"]


def test_ranks_that_disagree_fail_at_start_naming_the_difference(two_process_run):
    results, _ = two_process_run
    for result in results:
        dataset_error, modulator_error = result["errors"]
        assert "train_set length" in dataset_error and "rank 0 46, rank 1 45" in dataset_error
        assert "train_set labels" in dataset_error and "config." not in dataset_error
        assert "modulators: rank 0 2, rank 1 0" in modulator_error


def test_checkpoint_resumes_on_another_world_size(two_process_run):
    results, out_dir = two_process_run
    uninterrupted = train()[0]
    resumed = trainer_for(output_dir=str(out_dir / "two_to_one"), resume=True)
    resumed.fit()
    assert resumed.outer_step == uninterrupted.outer_step
    assert_states_equal(resumed.model_state(), uninterrupted.model_state(), "2 -> 1")
    for rank, result in enumerate(results):
        assert result["one_to_two"]["outer_step"] == uninterrupted.outer_step
        assert_states_equal(result["one_to_two"]["state"], uninterrupted.model_state(), ("1 -> 2", rank))


class DieAtStep(Callback):
    """Ends this process abruptly (no cleanup, as a crash would) after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, record: dict) -> None:
        if record["global_step"] == self.step:
            os._exit(0)


def dying_worker(rank: int, world_size: int, out_path: str) -> None:
    torch.manual_seed(0)
    trainer = MetaPEFTTrainer(TinyNet(dtype=torch.float64), LongTailedBlobs(COUNTS), config=config(),
                              callbacks=[DieAtStep(2)] if rank == 1 else [])
    try:
        trainer.fit()
        outcome = "finished"
    except Exception as error:  # the error the surviving rank gets is the backend's (gloo: a RuntimeError subclass)
        outcome = f"{type(error).__name__} at step {trainer.global_step}: {error}"
    if rank == 0:
        with open(out_path, "w") as f:
            f.write(outcome)


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_other_with_an_error(tmp_path):
    out_path = tmp_path / "rank0.txt"
    run_gloo(dying_worker, 2, str(out_path))
    outcome = out_path.read_text()
    assert outcome.startswith(("RuntimeError", "DistBackendError")) and " at step 2:" in outcome, outcome


def bad_eval_worker(rank: int, world_size: int, out_dir: str) -> None:
    """Evaluate a set whose sample 40 (rank 1's shard) is NaN: rank 1 names it, rank 0 raises too instead of
    waiting in the confusion matrices' all-reduce."""
    setup_distributed()
    data = LongTailedBlobs(COUNTS)
    data.x[40, 0] = float("nan")
    try:
        trainer_for().evaluate(data)
        message = "no error"
    except ValueError as error:
        message = str(error)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)


def test_a_data_error_on_one_rank_ends_every_rank(tmp_path):
    run_gloo(bad_eval_worker, 2, str(tmp_path))
    assert "eval_set sample 40 gives non-finite images" in (tmp_path / "rank1.txt").read_text()
    assert "another rank's shard failed its data checks" in (tmp_path / "rank0.txt").read_text()
