"""Run directories: a new run refuses an old one, overwrite moves it aside, one live run per directory (also across
processes), stale locks of dead processes and stale temp files are cleaned."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from metapeft.runs.lock import LOCK_NAME, RunDirectoryError, claim_run_directory, run_files
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from tests.helpers.toy import LongTailedBlobs, TinyNet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(code: str) -> subprocess.Popen:
    """A Python child process running ``code`` against this source tree, stdout piped."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})


def test_claim_records_the_holder_and_release_removes_the_lock(tmp_path):
    run = tmp_path / "run"
    with claim_run_directory(run) as claim:
        record = json.loads((run / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert claim.moved_to is None and run_files(run) == []
    assert not run.exists()  # created by the claim and left empty: removed
    (tmp_path / "kept").mkdir()
    with claim_run_directory(tmp_path / "kept"):
        pass
    assert os.listdir(tmp_path / "kept") == []


def test_new_run_refuses_an_old_one_resume_continues_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("old\n")
    with pytest.raises(RunDirectoryError, match=r"is not empty \(metrics.jsonl\); pass resume=True .*overwrite=True"):
        claim_run_directory(tmp_path)
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    with claim_run_directory(tmp_path, resume=True):
        assert (tmp_path / "metrics.jsonl").read_text() == "old\n"
    with pytest.raises(ValueError, match="exclude each other"):
        claim_run_directory(tmp_path, resume=True, overwrite=True)


def test_overwrite_moves_the_old_run_aside_never_deleting_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"old run")
    with claim_run_directory(run, overwrite=True) as claim:
        assert run_files(run) == [] and claim.moved_to.parent == tmp_path
        assert claim.moved_to.name.startswith("run.") and os.listdir(claim.moved_to) == ["checkpoint.pt"]
        assert (claim.moved_to / "checkpoint.pt").read_bytes() == b"old run"
        (run / "checkpoint.pt").write_bytes(b"second run")
    with claim_run_directory(run, overwrite=True) as again:
        assert again.moved_to != claim.moved_to and (again.moved_to / "checkpoint.pt").read_bytes() == b"second run"


def test_claims_are_reentrant_within_a_thread_only(tmp_path):
    outer = claim_run_directory(tmp_path)
    (tmp_path / "config.yaml").write_text("x")
    inner = claim_run_directory(tmp_path)  # the trainer inside the CLI's claim: no emptiness check
    assert inner is outer
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RunDirectoryError, claim_run_directory,
                                                                         tmp_path, resume=True)))
    thread.start()
    thread.join()
    assert "in use by another run in this process" in str(errors[0].value)
    inner.release()
    assert (tmp_path / LOCK_NAME).exists()
    outer.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_process_fails_at_once_naming_the_holder(tmp_path):
    holder = child(f"""
        import time
        from metapeft.runs.lock import claim_run_directory
        claim = claim_run_directory({str(tmp_path)!r})
        print("held", flush=True)
        time.sleep(60)
    """)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryError, match=f"in use by another run \\(pid {holder.pid} on "):
            claim_run_directory(tmp_path, resume=True)
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holder_leaves_a_stale_lock_that_does_not_block(tmp_path):
    holder = child(f"""
        import os, signal
        from metapeft.runs.lock import claim_run_directory
        claim_run_directory({str(tmp_path)!r}, resume=True)
        print("held", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert holder.stdout.readline().strip() == "held"
    assert holder.wait() == -signal.SIGKILL
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    (tmp_path / f".checkpoint.pt.{'0f' * 16}.tmp").write_bytes(b"torn by the killed run")
    with claim_run_directory(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert os.listdir(tmp_path) == []


def test_overwrite_moves_aside_a_run_whose_name_is_near_the_name_limit(tmp_path):
    """The timestamped sibling of a 250-character run name is shortened to fit 255 bytes (it failed before)."""
    run = tmp_path / ("r" * 250)
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"old run")
    for _ in range(2):
        with claim_run_directory(run, overwrite=True) as claim:
            assert len(claim.moved_to.name) <= 255 and claim.moved_to.name.startswith("r" * 200)
            (run / "checkpoint.pt").write_bytes(b"next run")
    moved = sorted(p.name for p in tmp_path.iterdir() if p != run)
    assert len(moved) == 2 and all(len(name) <= 255 for name in moved)


def test_a_trainer_run_that_stopped_before_its_first_checkpoint_is_replaced_by_a_new_one(tmp_path):
    """Its log alone is no old run: a new run (neither resume nor overwrite) reuses the directory and its log holds
    only the new run's lines."""
    class Crash:
        def on_step_end(self, trainer, record):
            if trainer.global_step == 2:
                raise RuntimeError("crashed at step 2")

    data, run = LongTailedBlobs([20, 12, 6, 4]), tmp_path / "run"
    config = TrainerConfig(epochs=1, batch_size=8, log_every=1, progress=False, output_dir=str(run))
    with pytest.raises(RuntimeError, match="crashed at step 2"):
        MetaPEFTTrainer(TinyNet(), data, config=config, callbacks=[Crash()]).fit()
    assert run_files(run) == ["metrics.jsonl"]
    MetaPEFTTrainer(TinyNet(), data, config=config).fit()
    steps = [json.loads(line)["global_step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    assert steps == list(range(1, len(steps) + 1)) and "checkpoint.pt" in run_files(run)
