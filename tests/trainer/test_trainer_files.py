"""The trainer and its run directory: a new run never overwrites an old one, a busy directory fails at once, and a
resume loads all or nothing."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from metapeft.atomic_files import LoadError
from metapeft.runs.lock import RunDirectoryError
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from tests.helpers.toy import LongTailedBlobs, TinyNet

COUNTS = [20, 12, 6, 4]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trainer(output_dir, counts=COUNTS, **kwargs):
    torch.manual_seed(0)
    config = TrainerConfig(epochs=1, batch_size=16, progress=False, output_dir=str(output_dir), **kwargs)
    return MetaPEFTTrainer(TinyNet(), LongTailedBlobs(counts), config=config)


def snapshot(t):
    return ({k: v.clone() for k, v in t.module.state_dict().items()},
            [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for s in t.optimizer.state.values()], t.global_step)


def assert_same(before, after):
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert len(before[1]) == len(after[1]) and before[2] == after[2]


def test_a_new_run_refuses_an_old_one_and_overwrite_moves_it_aside(tmp_path):
    run = tmp_path / "run"
    trainer(run).fit()
    first = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "model.safetensors")}
    with pytest.raises(RunDirectoryError, match="is not empty .*checkpoint.pt.*resume=True.*overwrite=True"):
        trainer(run).fit()
    assert {name: (run / name).read_bytes() for name in first} == first
    trainer(run, overwrite=True, seed=1).fit()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(aside) == 1 and {name: (aside[0] / name).read_bytes() for name in first} == first
    assert (run / "model.safetensors").read_bytes() != first["model.safetensors"]


def test_fit_fails_at_once_while_another_process_trains_there(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from metapeft.runs.lock import claim_run_directory
        claim_run_directory({str(tmp_path)!r})
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == "held"
        t = trainer(tmp_path, resume=True)
        with pytest.raises(RunDirectoryError, match=f"in use by another run \\(pid {holder.pid} "):
            t.fit()
        assert t.global_step == 0 and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_second_fit_of_the_same_trainer_continues_its_own_run(tmp_path):
    t = trainer(tmp_path, save_every_steps=1)
    t.fit(max_steps=2)
    result = t.fit()
    assert result["global_step"] == t.steps_per_epoch and (tmp_path / "model.safetensors").exists()


def test_resume_into_a_model_of_another_class_count_changes_nothing(tmp_path):
    trainer(tmp_path / "six", counts=[20, 12, 6, 4, 3, 3]).fit(max_steps=2)
    other = trainer(tmp_path / "six", resume=True)
    before = snapshot(other)
    with pytest.raises(LoadError, match=r"checkpoint .*checkpoint.pt does not fit the model: head.weight: file shape "
                                        r"\(6, 16\) != model shape \(4, 16\)"):
        other.fit()
    assert_same(before, snapshot(other))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_checkpoint_is_refused_before_anything_changes(tmp_path, how):
    trainer(tmp_path, save_every_steps=1).fit(max_steps=2)
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        weight = load_head_weight(path)
        at = data.find(weight.numpy().tobytes())
        data[at + 2] ^= 0x04
    path.write_bytes(bytes(data))
    resumed = trainer(tmp_path, resume=True, save_every_steps=1)
    before = snapshot(resumed)
    with pytest.raises(LoadError, match=f"{path}: " + ("not a readable checkpoint" if how == "truncated"
                                                        else "checksum mismatch")):
        resumed.fit()
    assert_same(before, snapshot(resumed))


def load_head_weight(path):
    return torch.load(path, weights_only=True)["state"]["model"]["head.weight"]
