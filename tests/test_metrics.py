"""``metapeft.metrics``: the chance-level metrics a diverged run is scored with, against a Monte-Carlo of uniformly
random predictions."""

from __future__ import annotations

import pytest
import torch

from metapeft.metrics import chance_metrics, evaluate


def test_chance_metrics_are_the_expected_metrics_of_random_predictions():
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)
    split = {"many": [0, 1], "few": [2, 3]}
    chance = chance_metrics(targets, 4, split)
    generator = torch.Generator().manual_seed(0)
    draws = [evaluate(torch.randint(0, 4, (100,), generator=generator), targets, 4, split) for _ in range(4000)]
    for key in ("accuracy", "class_mean_accuracy", "many_accuracy", "few_accuracy"):
        assert chance[key] == pytest.approx(0.25)
        assert sum(d[key] for d in draws) / len(draws) == pytest.approx(0.25, abs=0.01)
    # macro-F1 of the expected confusion matrix: within Monte-Carlo noise of the mean over random predictions
    assert chance["macro_f1"] == pytest.approx(sum(d["macro_f1"] for d in draws) / len(draws), abs=0.01)
    assert chance["num_samples"] == 100
