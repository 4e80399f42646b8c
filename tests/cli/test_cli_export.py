"""``metapeft export RUN --peft DIR``: HF PEFT reproduces the trained run's logits; a missing peft names the extra."""

from __future__ import annotations

import sys

import torch
import yaml

from metapeft.cli import main
from metapeft.runs.builders import build_backbone
from metapeft.runs.directory import load_run


def test_export_a_trained_run_to_peft_and_load_it_back(write_config, tmp_path, capsys, monkeypatch):
    from peft import PeftModel

    config = write_config(classifier="linear", epochs=1)
    assert main(["train", "--config", str(config)]) == 0
    run, out = tmp_path / "run", tmp_path / "peft"
    assert main(["export", str(run), "--peft", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    recorded, model, _ = load_run(run)
    with torch.random.fork_rng(devices=[]):  # the run's random backbone, rebuilt as build_model draws it
        torch.manual_seed(int(recorded["model"].get("seed", 0)))
        base = build_backbone(recorded["model"], recorded["num_classes"])
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x), rtol=1e-5, atol=1e-5)

    monkeypatch.setitem(sys.modules, "peft", None)
    assert main(["export", str(run), "--peft", str(tmp_path / "again")]) == 2
    assert 'pip install "metapeft[peft]"' in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["classifier"] == "linear"
