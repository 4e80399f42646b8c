"""Evaluation passes check what they read: a label outside [0, num_classes) as its batch arrives, non-finite images,
logits and head features at the end of the pass, each error naming the dataset and the sample's index; the epoch's
checkpoint is written before its evaluation, and a run resumed from it evaluates first."""

import json

import pytest
import torch

from metapeft.atomic_files import load_checkpoint
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from metapeft.trainer.evaluation import evaluate_model
from tests.helpers.toy import LongTailedBlobs, TinyNet

COUNTS = [20, 12, 6, 4]


class Altered(LongTailedBlobs):
    """LongTailedBlobs whose item ``index`` has a NaN pixel (``nan=True``) or the label ``label``; ``targets`` stay
    in range."""

    def __init__(self, index: int, nan: bool = False, label: int | None = None, **kwargs) -> None:
        super().__init__(COUNTS, **kwargs)
        self.index, self.label = index, label
        if nan:
            self.x[index, 3] = float("nan")

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x, (self.label if i == self.index and self.label is not None else y)


def quiet(**kwargs) -> TrainerConfig:
    return TrainerConfig(**{"progress": False, "batch_size": 8, "classifier": "linear", **kwargs})


def test_nan_images_are_refused_naming_the_sample_instead_of_scoring_class_0():
    """NaN logits argmax to class 0: the accuracy was plausible."""
    trainer = MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS), config=quiet())
    with pytest.raises(ValueError, match="eval_set sample 29 gives non-finite images"):
        trainer.evaluate(Altered(29, nan=True))
    model = TinyNet()
    with pytest.raises(ValueError, match="evaluation set sample 17 gives non-finite images"):
        evaluate_model(model, Altered(17, nan=True), num_classes=4, batch_size=5)


def test_nan_logits_from_finite_images_are_refused():
    trainer = MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS), config=quiet())
    with torch.no_grad():
        trainer.head.weight[2, 0] = float("nan")
    with pytest.raises(ValueError, match="eval_set sample 0 gives non-finite logits"):
        trainer.evaluate(LongTailedBlobs(COUNTS))


def test_an_out_of_range_label_is_named_and_the_epoch_checkpoint_survives(tmp_path):
    """The item's label (not its ``targets`` entry) is 9 of 4 classes: IndexError from index_add_ before, raised
    before the epoch's checkpoint was written, so the whole epoch was lost."""
    run = tmp_path / "run"
    trainer = MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS), config=quiet(epochs=2, output_dir=str(run)))
    with pytest.raises(ValueError, match=r"eval_set sample 33 has label 9, outside \[0, 4\)"):
        trainer.fit(eval_set=Altered(33, label=9))
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["position"]["epoch"] == 1 and state["position"]["eval_pending"]


def test_a_run_resumed_from_an_epoch_checkpoint_evaluates_first_and_logs_like_an_uninterrupted_one(tmp_path):
    data, eval_set = LongTailedBlobs(COUNTS), LongTailedBlobs(COUNTS, seed=5)
    whole = MetaPEFTTrainer(TinyNet(), data, config=quiet(epochs=2, output_dir=str(tmp_path / "whole")))
    whole.fit(eval_set=eval_set)

    class FailOnce:
        def on_evaluate(self, trainer, record):
            raise RuntimeError("evaluation crashed")

    first = MetaPEFTTrainer(TinyNet(), data, config=quiet(epochs=2, output_dir=str(tmp_path / "cut")),
                            callbacks=[FailOnce()])
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        first.fit(eval_set=eval_set)
    resumed = MetaPEFTTrainer(TinyNet(), data, config=quiet(epochs=2, output_dir=str(tmp_path / "cut"), resume=True))
    result = resumed.fit(eval_set=eval_set)

    def log(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert log("cut") == log("whole") and sum(r["event"] == "eval" for r in log("cut")) == 2
    assert result["accuracy"] == log("whole")[-1]["accuracy"]


def test_a_nan_training_image_under_the_cosine_head_names_the_sample():
    """The class-mean initialisation turned NaN and training reported "non-finite loss at step 1"."""
    trainer = MetaPEFTTrainer(TinyNet(), Altered(11, nan=True), config=quiet(classifier="cosine", epochs=1))
    with pytest.raises(ValueError, match="train_set sample 11 gives non-finite images"):
        trainer.fit()
