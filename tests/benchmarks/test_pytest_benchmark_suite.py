"""``python -m pytest benchmarks/ --benchmark-only``: the kernel benchmarks run under pytest-benchmark, one group per
shape and mode with every contender this machine runs, and ``--benchmark-autosave`` / ``--benchmark-compare`` work;
the default run (``testpaths``) does not collect them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_run_does_not_collect_the_benchmarks(pytestconfig):
    assert pytestconfig.getini("testpaths") == ["tests"]
    assert not list((ROOT / "tests").rglob("test_bench_*.py"))


def run_benchmarks(storage: Path, *extra: str) -> str:
    command = [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-k", "tiny and fwd-",
               "--benchmark-min-rounds=2", "--benchmark-max-time=0.001", "--benchmark-warmup=off",
               f"--benchmark-storage=file://{storage}", "-p", "no:cacheprovider", "-q", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "METAPEFT_BENCH_QUICK": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow  # two pytest processes: about 10 s idle, 30 s on this shared machine
def test_autosave_then_compare_across_runs(tmp_path):
    pytest.importorskip("pytest_benchmark")
    from benchmarks.test_bench_kernels import ADAPTER_CONTENDERS, LORA_CONTENDERS

    first = run_benchmarks(tmp_path, "--benchmark-autosave")
    assert "benchmark 'scaled_lora fwd tiny: M=16 K=16 N=16 S=1 r=4'" in first
    saved = sorted(tmp_path.rglob("*.json"))
    assert len(saved) == 1
    runs = json.loads(saved[0].read_text())["benchmarks"]
    groups = {}
    for run in runs:
        groups.setdefault(run["group"], set()).add(run["extra_info"]["contender"])
    assert groups == {
        "scaled_lora fwd tiny: M=16 K=16 N=16 S=1 r=4": set(LORA_CONTENDERS),
        "adapter parallel fwd tiny: M=16 D=16 bottleneck=4": set(ADAPTER_CONTENDERS),
        "adapter sequential fwd tiny: M=16 D=16 bottleneck=4": set(ADAPTER_CONTENDERS),
    }
    assert "metapeft_torch" in LORA_CONTENDERS and all(r["stats"]["median"] > 0 for r in runs)
    second = run_benchmarks(tmp_path, "--benchmark-compare")
    stem = saved[0].stem.split("_")[0]  # "0001": each row of the first run appears beside this run's
    assert f"({stem}_" in second and "(NOW)" in second, second[-2000:]
