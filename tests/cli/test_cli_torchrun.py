"""``metapeft train`` under torchrun (2 gloo processes on CPU) is the README's command: it joins the process group,
prints once, and rank 0 writes the run directory; with ``--set train.fsdp=true`` the model is sharded by FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.distributed import free_port


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["--set", "train.fsdp=true"]], ids=["ddp", "fsdp"])
def test_train_under_torchrun_with_two_processes(write_config, tmp_path, sharding):
    config = write_config(meta_lookahead_steps=2, meta_batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "metapeft", "train",
               "--config", str(config), *sharding]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("2 processes") == 1 and proc.stdout.count("class-mean") == 1, proc.stdout
    run = tmp_path / "run"
    assert json.loads((run / "eval.json").read_text())["accuracy"] >= 0.0
    assert (run / "adapter.safetensors").is_file() and (run / "checkpoint.pt").is_file()
