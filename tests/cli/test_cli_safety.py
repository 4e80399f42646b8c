"""The CLI never loses a run and never scores the wrong model: an existing run directory is refused (``--overwrite``
moves it aside), ``eval`` / ``gamma`` refuse run weights lacking tensors or damaged, bad config values name their key,
and the run's adapter loads into a fresh model with its class names and head."""

from __future__ import annotations

import pytest
import timm

import metapeft
from metapeft.atomic_files import load_safetensors, save_safetensors
from metapeft.cli import main
from metapeft.heads import CosineClassifier
from tests.helpers.cli import TINY_MODEL


def test_run_directory_refusal_overwrite_and_strict_eval(write_config, tmp_path, capsys):
    config = write_config(epochs=1)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config)]) == 0
    weights = (run / "model.safetensors").read_bytes()
    capsys.readouterr()

    assert main(["train", "--config", str(config)]) == 2
    assert "is not empty" in capsys.readouterr().err and (run / "model.safetensors").read_bytes() == weights
    assert main(["train", "--config", str(config), "--overwrite", "--set", "train.seed=1"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert "the previous run moved to" in capsys.readouterr().out
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == weights

    info = metapeft.adapter_files.read_adapter_info(run / "adapter.safetensors")
    assert info.class_names == ("zero", "one", "two", "three") and info.heads["head"]["type"] == "CosineClassifier"
    fresh = timm.create_model(TINY_MODEL["name"], pretrained=False, num_classes=4, **TINY_MODEL["kwargs"])
    metapeft.load_adapter(fresh, run / "adapter.safetensors")
    assert isinstance(fresh.head, CosineClassifier) and fresh.head.num_classes == 4

    tensors, metadata = load_safetensors(run / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if "lora" not in k and not k.startswith("head.")}
    save_safetensors(kept, run / "model.safetensors", {k: v for k, v in metadata.items() if k != "sha256"})
    for command in ("eval", "gamma"):
        assert main([command, str(run)]) == 2
        err = capsys.readouterr().err
        # 2 blocks x 4 LoRAs x (A, B) + the head's weight
        assert f"{run / 'model.safetensors'} does not fit the model: missing 17 tensor(s)" in err
        assert "blocks.0.attn.qkv.lora_A" in err
    (run / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert main(["eval", str(run)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("setting, key", [
    ("train.lr=\"0.05\"", "lr must be a finite number"), ("train.lr=.inf", "lr must be a finite number"),
    ("train.lr=.nan", "lr must be a finite number"), ("train.batch_size=true", "batch_size must be an int"),
    ("data.image_size=big", "data.image_size must be an int"), ("peft.alpha=-4", "alpha must be > 0"),
    ("peft.init_gamma=.nan", "init_gamma must be a finite number"),
])
def test_bad_config_values_name_their_key_and_leave_no_run(write_config, tmp_path, capsys, setting, key):
    assert main(["train", "--config", str(write_config()), "--set", setting]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

