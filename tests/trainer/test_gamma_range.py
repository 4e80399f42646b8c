"""A meta learning rate that sends gamma to 0.0 or far above 1 ended with success and no word: the trainer warns once
per module and records it in the metrics log (and a resumed run logs the same)."""

import json
import logging

import torch

from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from metapeft.trainer.gamma_range import GAMMA_RANGE, GammaRangeWatch, outside_range
from tests.helpers.toy import LongTailedBlobs, TinyNet


def run(output_dir, **kwargs):
    torch.manual_seed(0)
    config = TrainerConfig(**{"progress": False, "batch_size": 8, "epochs": 2, "meta_lr": 100.0, "meta_interval": 1,
                              "classifier": "linear", "log_every": 1, "output_dir": str(output_dir),
                              "meta_warmup_steps": 0, **kwargs})
    return MetaPEFTTrainer(TinyNet(), LongTailedBlobs([20, 12, 6, 4]), config=config)


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_a_meta_lr_sending_gamma_to_zero_is_warned_and_logged_once(tmp_path, caplog):
    trainer = run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="metapeft.trainer"):
        trainer.fit()
    assert trainer.gammas()["l1"] == [0.0]
    warnings = [r for r in caplog.records if "gamma left the range" in r.getMessage()]
    logged = [r for r in records(tmp_path) if r["event"] == "gamma_range"]
    assert len(warnings) == 1 and "at global step 3 in 1 module(s): l1: [1.04" in warnings[0].getMessage()
    assert [list(r["modules"]) for r in logged] == [["l1"]] and logged[0]["range"] == list(GAMMA_RANGE)
    first = logged[0]["global_step"]
    steps = {r["global_step"]: r for r in records(tmp_path) if r["event"] == "step"}
    assert first in steps


def test_a_resumed_run_logs_the_warning_as_an_uninterrupted_one_does(tmp_path):
    run(tmp_path / "whole").fit()
    run(tmp_path / "cut").fit(max_steps=8)
    run(tmp_path / "cut", resume=True).fit()
    assert records(tmp_path / "cut") == records(tmp_path / "whole")


def test_the_watch_flags_values_outside_the_range_and_non_finite_ones():
    gammas = {"a": [1.0, 2.0], "b": [5e4], "c": [0.0], "d": [float("nan")]}
    assert list(outside_range(gammas)) == ["b", "c", "d"]
    watch = GammaRangeWatch()
    assert watch.check(gammas, {"global_step": 3})["modules"] == {k: gammas[k] for k in "bcd"}
    assert watch.check(gammas, {"global_step": 4}) is None and watch.state_dict() == ["b", "c", "d"]
