"""Config and API values are checked with errors naming the key: types, finiteness, ranges, declared classes."""

import pytest
import torch

import metapeft
from metapeft.inject import peft_modules
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from tests.helpers.vit import tiny_vit


@pytest.mark.parametrize("values, message", [
    ({"lr": "0.05"}, "lr must be a finite number, got '0.05' (str)"),
    ({"lr": float("inf")}, "lr must be a finite number, got inf"),
    ({"meta_lr": float("nan")}, "meta_lr must be a finite number, got nan"),
    ({"batch_size": True}, "batch_size must be an int, got True (bool)"),
    ({"epochs": 2.0}, "epochs must be an int, got 2.0 (float)"),
    ({"meta": "yes"}, "meta must be true or false, got 'yes'"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm must be a finite number or null, got inf"),
    ({"momentum": -0.5}, "momentum must be >= 0"),
    ({"num_classes": 0}, "num_classes must be None or a positive int"),
    ({"output_dir": "run", "resume": True, "overwrite": True}, "resume and overwrite exclude each other"),
    ({"overwrite": True}, "need output_dir"),
])
def test_trainer_config_names_the_bad_key(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainerConfig(**values)


def test_integers_are_accepted_as_numbers_and_the_defaults_pass():
    assert TrainerConfig(lr=1, max_grad_norm=2).lr == 1 and TrainerConfig().epochs == 10


def test_labels_beyond_the_declared_classes_are_an_error_not_a_bigger_head():
    data = [(torch.randn(12), label) for label in (0, 1, 99)]
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    with pytest.raises(ValueError, match=r"train_set has label 99, but num_classes is 10"):
        MetaPEFTTrainer(model, data, config=TrainerConfig(num_classes=10, classifier="linear", head="0"))
    trainer = MetaPEFTTrainer(model, data[:2], config=TrainerConfig(num_classes=10, classifier="linear", head="0"))
    assert trainer.num_classes == 10


@pytest.mark.parametrize("values, message", [
    ({"alpha": -4}, "alpha must be > 0, got -4"), ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"init_gamma": float("inf")}, "init_gamma must be a finite number"), ({"dropout": True}, "dropout must be"),
])
def test_inject_names_the_bad_value_and_changes_nothing(values, message):
    model = tiny_vit()
    with pytest.raises(ValueError, match=message):
        metapeft.inject(model, **values)
    assert not peft_modules(model) and not hasattr(model, "metapeft_config")
