"""Non-finite training states: the first cause and step are named, nothing non-finite is logged or written, the
last good checkpoint survives; the monitor reads the host only when asked."""

import json
import pickle

import pytest
import torch

from metapeft.atomic_files import load_checkpoint
from metapeft.data.sampling import epoch_batches
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from metapeft.trainer.nonfinite import NonFiniteError, NonFiniteMonitor, all_finite
from tests.helpers.oracle import HostReadCounter
from tests.helpers.toy import LongTailedBlobs, TinyNet

COUNTS = [20, 12, 6, 4]


class PoisonedBlobs(LongTailedBlobs):
    """LongTailedBlobs whose sample ``poisoned`` is NaN."""

    def __init__(self, poisoned: int) -> None:
        super().__init__(COUNTS)
        self.x[poisoned, 3] = float("nan")


def config(output_dir, **kwargs):
    # no scale warm-up: its hypergradients would meet the NaN batch first (they are monitored as meta steps)
    return TrainerConfig(**{"epochs": 2, "batch_size": 8, "progress": False, "output_dir": str(output_dir),
                            "save_every_steps": 1, "log_every": 1, "classifier": "linear", "meta_warmup_steps": 0,
                            **kwargs})


def assert_last_good_checkpoint(run, failed_step):
    state = load_checkpoint(run / "checkpoint.pt")  # verified: checksum and finite
    assert state["position"]["global_step"] == failed_step - 1
    assert not (run / "model.safetensors").exists()
    losses = [json.loads(line).get("train_loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == failed_step - 1 and None not in losses


def test_diverging_plain_peft_stops_at_the_first_non_finite_step(tmp_path):
    data = LongTailedBlobs(COUNTS)
    trainer = MetaPEFTTrainer(TinyNet(meta=False), data, config=config(tmp_path, meta=False, lr=1e12))
    with pytest.raises(NonFiniteError) as error:
        trainer.fit()
    assert error.value.cause in ("loss", "gradient") and f"at global step {error.value.global_step}" in str(error.value)
    assert_last_good_checkpoint(tmp_path, error.value.global_step)
    # oracle: the same run stepped by hand; its first non-finite loss or gradient is at that step
    torch.manual_seed(0)
    twin = MetaPEFTTrainer(TinyNet(meta=False), data, config=config(tmp_path / "twin", meta=False, lr=1e12))
    twin.fit(max_steps=error.value.global_step - 1)
    x, y = data.x, torch.tensor(data.labels)
    batch = epoch_batches(twin.train_indices, 8, 0, twin.epoch)[twin.step_in_epoch]
    loss = twin.step.loss_fn(twin.model, (x[batch], y[batch]))
    grads = torch.autograd.grad(loss, twin.phi)
    assert not (torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads))


def test_a_nan_input_is_named_as_the_cause_not_the_modulator(tmp_path):
    poisoned = 17
    train, val = PoisonedBlobs(poisoned), LongTailedBlobs(COUNTS, seed=2)
    trainer = MetaPEFTTrainer(TinyNet(), train, val_set=val, config=config(tmp_path))
    order = torch.cat(epoch_batches(trainer.train_indices, 8, 0, 0))
    expected_step = int((order == poisoned).nonzero()) // 8 + 1
    with pytest.raises(NonFiniteError, match=f"non-finite input batch at global step {expected_step}"):
        trainer.fit()
    assert_last_good_checkpoint(tmp_path, expected_step)


def test_a_nan_raised_later_by_a_layer_is_traced_to_its_first_cause(tmp_path):
    """A NaN modulator (from a NaN hypergradient) makes the next step's forward raise; fit names the earlier cause."""
    trainer = MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS), config=config(tmp_path))
    trainer.step.monitor.observe(4, hypergradient=torch.tensor(False))
    with torch.no_grad():
        trainer.model.l1.modulator.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite hypergradient at global step 4") as error:
        trainer.fit()
    assert error.value.__cause__ is not None  # the layer's own error, kept as the cause


def test_monitor_keeps_the_first_step_and_cause_in_causal_order_without_host_reads():
    monitor = NonFiniteMonitor(torch.device("cpu"))
    ok, bad = torch.tensor(True), torch.tensor(False)
    with HostReadCounter() as counter:
        monitor.observe(1, input_batch=ok, loss=ok, gradient=ok)
        monitor.observe(2, loss=bad, gradient=bad, modulator=bad)
        monitor.observe(3, input_batch=bad)
        flag = all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert counter.count == 0 and not bool(flag)
    with pytest.raises(NonFiniteError, match="non-finite loss at global step 2"):
        monitor.raise_if_bad()
    assert all_finite([torch.zeros(2, dtype=torch.uint8)]) is None and all_finite([torch.zeros(0, 3)]) is None


def test_the_checks_add_no_host_read_to_a_training_step(monkeypatch):
    """A step's host reads (on a GPU: syncs) are the same with the monitor as with its observe() a no-op."""
    data = LongTailedBlobs(COUNTS)

    def reads_of_one_step():
        torch.manual_seed(0)
        trainer = MetaPEFTTrainer(TinyNet(), data, config=TrainerConfig(batch_size=8, progress=False))
        batch = trainer.train_indices[:8]
        x, y = data.x[batch], torch.tensor(data.labels)[batch]
        with HostReadCounter() as counter:
            trainer.train_step(x, y, batch)
        return counter.count

    checked = reads_of_one_step()
    monkeypatch.setattr(NonFiniteMonitor, "observe", lambda self, global_step, **finite: None)
    assert reads_of_one_step() == checked


def test_a_nan_training_image_is_named_by_its_index_and_batch(tmp_path):
    data = PoisonedBlobs(poisoned=21)
    trainer = MetaPEFTTrainer(TinyNet(), data, config=config(tmp_path / "run"))
    position = next(i for i, batch in enumerate(epoch_batches(trainer.train_indices, 8, 0, 0)) if 21 in batch)
    with pytest.raises(NonFiniteError, match=rf"non-finite input batch at global step {position + 1} \(train_set "
                                             rf"sample 21, in batch {position} of epoch 0\)") as error:
        trainer.fit()
    assert error.value.detail.startswith("train_set sample 21")
    assert str(pickle.loads(pickle.dumps(error.value))) == str(error.value)
