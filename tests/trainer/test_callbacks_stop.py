"""Trainer callbacks (events, order, payloads against the JSONL log and the checkpoints) and the public stop request
(from another thread, from a signal handler, before fit: each resumes bit for bit; on one of two gloo ranks: both
stop at the same step)."""

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from metapeft.atomic_files import load_checkpoint
from metapeft.trainer import Callback, MetaPEFTTrainer, TrainerConfig
from tests.helpers.distributed import run_gloo
from tests.helpers.toy import LongTailedBlobs, TinyNet

COUNTS = [20, 12, 6, 4]  # 42 samples: batches of 16, 16, 10 -> 3 steps per epoch


class Recorder(Callback):
    """Records every event with a copy of its payload; ``on_step`` runs extra code after a given step."""

    def __init__(self, on_step=None):
        self.events, self.on_step = [], on_step or {}

    def on_fit_start(self, trainer):
        self.events.append(("fit_start", trainer.global_step))

    def on_step_end(self, trainer, record):
        self.events.append(("step_end", dict(record)))
        if record["global_step"] in self.on_step:
            self.on_step[record["global_step"]](trainer)

    def on_checkpoint(self, trainer, record):
        # the file is complete when the event arrives: its position is the payload's
        position = load_checkpoint(record["path"])["position"]
        self.events.append(("checkpoint", {**record, "file_global_step": position["global_step"]}))

    def on_epoch_end(self, trainer, record):
        self.events.append(("epoch_end", dict(record)))

    def on_evaluate(self, trainer, record):
        self.events.append(("evaluate", dict(record)))

    def on_fit_end(self, trainer, result):
        self.events.append(("fit_end", dict(result)))


def make_trainer(output_dir, callbacks=(), resume=False, **config):
    torch.manual_seed(0)
    settings = dict(epochs=2, batch_size=16, meta_lr=0.05, meta_interval=2, progress=False, log_every=1,
                    output_dir=str(output_dir), resume=resume)
    return MetaPEFTTrainer(TinyNet(dropout=0.2), LongTailedBlobs(COUNTS), callbacks=callbacks,
                           config=TrainerConfig(**{**settings, **config}))


def test_events_come_in_order_with_the_documented_payloads(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, [recorder], save_every_steps=2)
    result = trainer.fit(eval_set=LongTailedBlobs(COUNTS, seed=5))

    expected = [("fit_start", None)]
    for step in range(1, 7):  # brute force: what fit promises, step by step
        expected.append(("step_end", step))
        if step % 2 == 0:
            expected.append(("checkpoint", step))
        if step % 3 == 0:
            expected += [("epoch_end", step), ("checkpoint", step), ("evaluate", step)]
    expected.append(("fit_end", None))
    assert [(name, None if name in ("fit_start", "fit_end") else payload["global_step"])
            for name, payload in recorder.events] == expected

    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged_steps = [r for r in logged if r["event"] == "step"]
    steps = [payload for name, payload in recorder.events if name == "step_end"]
    assert [(s["epoch"], s["step_in_epoch"], s["batch_size"]) for s in steps] == \
        [(0, 1, 16), (0, 2, 16), (0, 3, 10), (1, 1, 16), (1, 2, 16), (1, 3, 10)]
    for step, line in zip(steps, logged_steps, strict=True):
        assert step["event"] == "step" and step["lr"] == line["lr"]
        assert isinstance(step["train_loss"], torch.Tensor) and step["train_loss"].ndim == 0
        assert float(step["train_loss"]) == line["train_loss"]
        # meta_interval=2: meta steps at global steps 0, 2, 4, i.e. the records of steps 1, 3, 5
        assert ("meta_loss" in step) == (step["global_step"] % 2 == 1) == ("meta_loss" in line)
        if "meta_loss" in step:
            assert float(step["meta_loss"]) == line["meta_loss"]
    epoch_records = [payload for name, payload in recorder.events if name in ("epoch_end", "evaluate")]
    assert epoch_records == [r for r in logged if r["event"] in ("epoch", "eval")]

    checkpoints = [payload for name, payload in recorder.events if name == "checkpoint"]
    assert [c["reason"] for c in checkpoints] == ["interval", "epoch", "interval", "interval", "epoch"]
    assert all(c["path"] == tmp_path / "checkpoint.pt" and c["file_global_step"] == c["global_step"]
               for c in checkpoints)
    assert recorder.events[-1][1] == result and result["stopped"] is False
    last_evaluation = [payload for name, payload in recorder.events if name == "evaluate"][-1]
    assert result["accuracy"] == last_evaluation["accuracy"]


def test_any_object_with_some_event_methods_is_a_callback(tmp_path):
    class EpochCounter:
        def __init__(self):
            self.epochs = []

        def on_epoch_end(self, trainer, record):
            self.epochs.append(record["epoch"])

    counter = EpochCounter()
    make_trainer(tmp_path, [counter]).fit()
    assert counter.epochs == [1, 2]


def test_a_callback_error_ends_fit_and_keeps_the_last_checkpoint(tmp_path):
    def fail(trainer):
        raise RuntimeError("observer failed")

    trainer = make_trainer(tmp_path, [Recorder(on_step={4: fail})])
    with pytest.raises(RuntimeError, match="observer failed"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["position"]["global_step"] == 3  # the epoch-1 checkpoint


def from_another_thread(trainer):
    thread = threading.Thread(target=trainer.request_stop)
    thread.start()
    thread.join()


def by_a_signal(trainer):
    os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs on this thread before the next step starts


@pytest.mark.parametrize("how, stop_after", [("before_fit", 0), ("thread", 2), ("signal", 3), ("signal", 4)],
                         ids=["before-fit", "thread-mid-epoch", "signal-at-epoch-end", "signal-mid-epoch"])
def test_a_stop_request_ends_at_a_step_boundary_and_resumes_exactly(tmp_path, how, stop_after):
    straight = make_trainer(tmp_path / "straight")
    straight.fit()

    recorder = Recorder(on_step={stop_after: from_another_thread if how == "thread" else by_a_signal})
    stopped = make_trainer(tmp_path / "stopped", [recorder])
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: stopped.request_stop())
    try:
        if how == "before_fit":
            stopped.request_stop()
        result = stopped.fit()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result == {"global_step": stop_after, "epoch": stop_after // 3, "stopped": True}
    assert not stopped.stop_requested  # consumed
    assert recorder.events[-2][0] == "checkpoint" and recorder.events[-2][1]["reason"] == "stop"
    assert load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["position"]["global_step"] == stop_after
    assert not (tmp_path / "stopped" / "model.safetensors").exists()

    resumed = make_trainer(tmp_path / "stopped", resume=True)
    assert resumed.fit()["global_step"] == 6
    for (name, expected), actual in zip(straight.model_state().items(), resumed.model_state().values(), strict=True):
        assert torch.equal(expected, actual), name
    assert (tmp_path / "stopped" / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()


def stop_on_rank_1_worker(rank: int, world_size: int, output_dir: str, log_every: int) -> None:
    recorder = Recorder(on_step={2: MetaPEFTTrainer.request_stop} if rank == 1 else {})
    result = make_trainer(output_dir, [recorder], log_every=log_every).fit()
    (Path(output_dir) / f"result{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize(("log_every", "stop_step", "epoch"), [(1, 2, 0), (3, 3, 1)],
                         ids=["log_every_1", "log_every_3"])
def test_a_stop_requested_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, log_every, stop_step, epoch):
    """Ranks agree at log boundaries (no per-step sync): a stop asked on rank 1 after step 2 ends both at the next."""
    run_gloo(stop_on_rank_1_worker, 2, str(tmp_path), log_every)  # a rank that did not stop would hang the other
    results = [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in range(2)]
    assert results == [{"global_step": stop_step, "epoch": epoch, "stopped": True}] * 2  # 3 steps per epoch
    assert load_checkpoint(tmp_path / "checkpoint.pt")["position"]["global_step"] == stop_step
