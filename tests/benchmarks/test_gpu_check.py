"""``benchmarks/gpu_check.py``: the CPU-machine path, the JUnit counting and the choice of the CUDA default backend."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_without_a_gpu_it_says_why_and_records_nothing():
    results = sorted(p.name for p in gpu_check.RESULTS_DIR.iterdir())
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped, nothing recorded" in proc.stdout and gpu_check.no_gpu_reason() in proc.stdout
    assert sorted(p.name for p in gpu_check.RESULTS_DIR.iterdir()) == results


def test_junit_counts_match_a_real_pytest_run(tmp_path):
    (tmp_path / "test_three.py").write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert False\n\n"
        "def test_skip():\n    pytest.skip('no')\n")
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_three.py"),
                    f"--junitxml={junit}"], cwd=tmp_path, capture_output=True, timeout=300)
    counts, failed = gpu_check.junit_counts(junit)
    assert counts == {"passed": 1, "failed": 1, "skipped": 1}
    assert len(failed) == 1 and failed[0].endswith("::test_bad")
    assert gpu_check.junit_counts(tmp_path / "absent.xml") == ({"passed": 0, "failed": 0, "skipped": 0}, [])


def rows(times: dict[str, list[float]], ms: list[int]) -> list[dict]:
    """fwd+bwd benchmark rows (plus a fwd row that must be ignored): base 1 ms, plain 2 ms, hf_peft 4 ms."""
    out = []
    for i, m in enumerate(ms):
        row = {"M": m, "mode": "fwd+bwd", "base_ms": 1.0, "plain_ms": 2.0, "hf_peft_ms": 4.0}
        row.update({f"{backend}_ms": values[i] for backend, values in times.items()})
        out += [row, {**row, "mode": "fwd", "torch_ms": 1e-6}]
    return out


def test_the_fastest_backend_with_passing_tests_becomes_the_default():
    times = {"torch": [2.0, 2.0], "triton": [1.0, 1.6], "cuda": [0.5, 4.0]}
    ratios, choice, reason = gpu_check.headline(rows(times, [256, 8192]), failed_tests=[])
    assert choice == "triton" and "triton" in reason  # geomeans: torch 2, triton 1.26, cuda 1.41
    assert math.isclose(ratios["triton"]["speed_vs_plain_large_M"], 2.0 / 1.6)  # only M >= 4096 counts
    assert math.isclose(ratios["cuda"]["speed_vs_hf_peft_large_M"], 1.0)
    assert math.isclose(ratios["torch"]["time_vs_base"], 2.0)
    failed = ["tests.gpu.test_scaled_lora_triton_gpu::test_large"]
    assert gpu_check.headline(rows(times, [256, 8192]), failed)[1] == "cuda"
    assert gpu_check.headline(rows({"triton": [1.0]}, [256]), failed)[1] is None
