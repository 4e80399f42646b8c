"""``metapeft train`` + ``eval`` + ``gamma`` end to end on a tiny generated dataset; Ctrl-C and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metapeft.atomic_files import load_checkpoint
from metapeft.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_train_eval_gamma_end_to_end(write_config, tmp_path, capsys):
    config = write_config(eval_each_epoch=True)
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert "epoch 1/2 | loss" in out and "epoch 2/2 | loss" in out and "img/s" in out and "| test acc" in out
    assert "| LoRA + MetaPEFT |" in out
    for name in ("config.yaml", "checkpoint.pt", "metrics.jsonl", "model.safetensors", "adapter.safetensors",
                 "eval.json"):
        assert (run / name).is_file(), name
    trained = json.loads((run / "eval.json").read_text())
    assert set(trained) >= {"accuracy", "class_mean_accuracy", "head_accuracy", "tail_accuracy", "macro_f1"}

    # eval rebuilds the model from the run directory alone: same predictions as the trainer's own evaluation.
    assert main(["eval", str(run), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again == trained
    table = capsys.readouterr().out
    assert "| method" in table and "head" in table and "tail" in table and "macro-F1" in table
    assert f"{100 * trained['accuracy']:.1f}" in table
    # --data with an index file: the training split (through the test transform), 38 images
    assert main(["eval", str(run), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    data_root = Path(_run_config(run)["data"]["root"])
    assert main(["eval", str(run), "--data", str(data_root / "train.txt"), "--json", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["num_samples"] == 38
    # --split train evaluates through the test transform (no random crops): deterministic
    for name in ("s1.json", "s2.json"):
        assert main(["eval", str(run), "--split", "train", "--json", str(tmp_path / name)]) == 0
    assert (tmp_path / "s1.json").read_text() == (tmp_path / "s2.json").read_text()
    assert json.loads((tmp_path / "s1.json").read_text()) == json.loads((tmp_path / "t.json").read_text())
    capsys.readouterr()

    assert main(["gamma", str(run), "--plot", str(tmp_path / "gamma.png")]) == 0
    gamma_out = capsys.readouterr().out
    assert (tmp_path / "gamma.png").read_bytes()[:4] == b"\x89PNG"
    assert gamma_out.splitlines()[0].split() == ["layer", "q", "k", "v", "out", "mlp1", "mlp2"]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in gamma_out.splitlines()[1:3]}
    modulators = {k: v for k, v in load_file(str(run / "model.safetensors")).items() if k.endswith("modulator")}
    q_gamma_block0 = torch.nn.functional.softplus(modulators["blocks.0.attn.qkv.modulator"])[0]
    assert rows["0"][0] == pytest.approx(float(q_gamma_block0), abs=1e-3)
    assert any(abs(v - 1.0) > 1e-3 for v in rows["0"] + rows["1"]), "meta-learning left every gamma at 1"


def _run_config(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def _step_lines(log: Path) -> int:
    if not log.exists():
        return 0
    return sum('"event": "step"' in line for line in log.read_text().splitlines())


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(write_config, tmp_path, capsys):
    config = write_config(epochs=4)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "metapeft", "train", "--config", str(config)], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while _step_lines(run / "metrics.jsonl") < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "resume with: metapeft train --config" in output and "--resume" in output
    state = load_checkpoint(run / "checkpoint.pt")
    interrupted_at = state["position"]["global_step"]
    assert 3 <= interrupted_at < 20 and not (run / "model.safetensors").exists()

    assert main(["train", "--config", str(config), "--resume"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["position"]["global_step"] == 20
    steps = [json.loads(line)["global_step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"event": "step"' in line]
    assert steps == list(range(1, 21))

    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "straight")]) == 0
    resumed, straight = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "straight" /
                                                                                 "model.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in resumed:  # same kernels, same thread count, same data order and RNG: bitwise equal
        assert torch.equal(resumed[key], straight[key]), key
    capsys.readouterr()
