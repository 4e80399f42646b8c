"""``benchmarks/gpu_check.py``: the CPU-machine path, the dry run of every stage, stage limits and failures, the
JUnit counting, the headline ratios, the choice of the CUDA default backend and where it is recorded and read."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
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


def test_whole_step_headlines_are_multiples_of_the_reference_contender():
    vit = gpu_check.vit_headline([{"contender": "metapeft", "ms": 10.0, "peak_MiB": 100.0},
                                  {"contender": "hf_peft", "ms": 12.0, "peak_MiB": 150.0},
                                  {"contender": "plain", "ms": 9.0}])
    assert vit == {"hf_peft": {"time_x_metapeft": 1.2, "peak_x_metapeft": 1.5}, "plain": {"time_x_metapeft": 0.9}}
    meta = gpu_check.meta_headline([{"contender": "plain_step", "ms": 1.0}, {"contender": "exact", "ms": 3.0,
                                    "peak_growth_MiB": 10.0}, {"contender": "naive_exact", "ms": 4.0,
                                                                "peak_growth_MiB": 40.0}])
    assert meta == {"exact": {"time_x_plain_step": 3.0, "time_x_naive_exact": 0.75, "memory_x_naive_exact": 0.25}}
    adapters = gpu_check.adapter_headline([
        {"kind": "parallel", "mode": "fwd+bwd", "plain/fused[triton]": 2.0},
        {"kind": "parallel", "mode": "fwd+bwd", "plain/fused[triton]": 8.0},
        {"kind": "parallel", "mode": "fwd", "plain/fused[triton]": 100.0}])
    assert adapters == {"fused[triton]": {"speed_vs_plain_parallel": 4.0}}


def test_a_stage_is_stopped_at_its_limit_with_every_process_it_started(tmp_path):
    start = time.perf_counter()
    # the shell's background sleep is a grandchild: killing the shell alone would leave it running
    result = gpu_check.run_stage("sleepy", ["sh", "-c", "echo begun; sleep 60 & sleep 60"], 1.0, tmp_path)
    assert result["status"] == "timed out" and "begun" in result["output_tail"]
    assert time.perf_counter() - start < 30
    assert gpu_check.run_stage("bad", [sys.executable, "-c", "raise SystemExit(3)"], 30, tmp_path)["status"] == "failed"


def test_a_failed_or_timed_out_stage_is_recorded_with_what_it_reached_and_the_next_stage_runs(tmp_path, monkeypatch):
    """build times out, gpu_tests fails, vit_step is killed after writing one row, meta_step passes (stand-ins)."""
    progress = tmp_path / "out" / "gpu_check_logs" / "vit_step.json"
    partial = {"rows": [{"contender": "metapeft", "ms": 1.0}], "errors": {}, "reached": "1 rows", "done": False}
    py = sys.executable
    commands = {
        "build": ([py, "-c", "import time; print('compiling', flush=True); time.sleep(60)"], {}),
        "gpu_tests": ([py, "-c", "print('tests/gpu/test_x.py::test_a PASSED'); print('tests/gpu/test_x.py::test_b "
                            "FAILED'); raise SystemExit(1)"], {}),
        "vit_step": ([py, "-c", f"import json, time; open({str(progress)!r}, 'w').write({json.dumps(partial)!r}); "
                            "time.sleep(60)"], {}),
        "meta_step": ([py, "-c", f"import json; open({str(progress.with_name('meta_step.json'))!r}, 'w').write("
                             f"{json.dumps({**partial, 'done': True})!r})"], {}),
    }
    monkeypatch.setattr(gpu_check, "stage_commands", lambda args, log_dir, limits: commands)
    monkeypatch.setenv("METAPEFT_CACHE", str(tmp_path / "cache"))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "out"), "--limit", "build=2", "--limit", "vit_step=4",
                           "--stages", "build,gpu_tests,vit_step,meta_step"]) == 0
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())[-1]
    stages = {s["stage"]: s for s in record["stages"]}
    assert [s["stage"] for s in record["stages"]] == ["build", "gpu_tests", "vit_step", "meta_step"]
    assert stages["build"]["status"] == "timed out" and stages["build"]["reached"] == "compiling"
    assert stages["gpu_tests"]["status"] == "failed" and stages["gpu_tests"]["reached"].startswith("1 passed, 1 failed")
    assert record["failed_tests"] == ["tests/gpu/test_x.py::test_b"]
    assert stages["vit_step"]["status"] == "timed out" and stages["vit_step"]["rows"] == partial["rows"]
    assert stages["meta_step"]["status"] == "passed"
    assert "build timed out; gpu_tests failed; vit_step timed out; meta_step passed" in record["summary"]
    assert "timed out" in (tmp_path / "out" / "gpu_check.md").read_text()
    assert not (tmp_path / "cache").exists()


def test_a_previous_runs_progress_never_passes_for_this_runs(tmp_path, monkeypatch):
    logs = tmp_path / "gpu_check_logs"
    logs.mkdir()
    (logs / "vit_step.json").write_text(json.dumps({"rows": [{"contender": "metapeft", "ms": 1.0}], "errors": {},
                                                    "reached": "done", "done": True}))
    (logs / "gpu_tests.xml").write_text('<testsuite><testcase classname="old" name="test_ok"/></testsuite>')
    crash = ([sys.executable, "-c", "raise SystemExit('died at import')"], {})
    commands = {"vit_step": crash, "gpu_tests": crash}
    monkeypatch.setattr(gpu_check, "stage_commands", lambda args, log_dir, limits: commands)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--stages", "gpu_tests,vit_step"]) == 0
    stages = {s["stage"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())[-1]["stages"]}
    assert stages["vit_step"]["status"] == "failed" and stages["vit_step"]["rows"] == []
    assert "died at import" in stages["vit_step"]["reached"]
    assert stages["gpu_tests"]["counts"] == {"passed": 0, "failed": 0, "skipped": 0}


def test_the_user_cache_is_read_before_the_shipped_default(tmp_path, monkeypatch):
    from metapeft.ops import backends

    shipped = tmp_path / "shipped" / "gpu_default.json"
    shipped.parent.mkdir()
    shipped.write_text(json.dumps({"cuda_default_backend": "torch"}))
    monkeypatch.setattr(backends, "GPU_DEFAULT_FILE", shipped)
    monkeypatch.delenv("METAPEFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    try:
        assert gpu_check.user_default_file() == tmp_path / "xdg" / "metapeft" / "gpu_default.json"
        assert backends.recorded_default_file() == shipped and backends.recorded_cuda_default_backend() == "torch"
        monkeypatch.setenv("METAPEFT_CACHE", str(tmp_path / "cache"))
        user = gpu_check.user_default_file()
        assert user == tmp_path / "cache" / "gpu_default.json"
        user.parent.mkdir()
        user.write_text(json.dumps({"cuda_default_backend": "triton"}))
        backends.refresh_backends()
        assert backends.recorded_default_file() == user and backends.auto_order("cuda")[0] == "triton"
    finally:
        backends.refresh_backends()


def test_dry_run_exercises_every_stage_and_writes_only_under_out(tmp_path):
    results = sorted(p.name for p in gpu_check.RESULTS_DIR.iterdir())
    env = {**os.environ, "METAPEFT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())[-1]
    stages = {s["stage"]: s for s in record["stages"]}
    assert list(stages) == list(gpu_check.STAGES)
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(gpu_check.STAGES, "passed"), \
        {name: s["output_tail"][-1500:] for name, s in stages.items() if s["status"] != "passed"}
    assert record["dry_run"] and record["summary"].startswith(gpu_check.DRY_RUN_NOTE)
    vit = {row["contender"]: row for row in stages["vit_step"]["rows"]}
    assert set(vit) == {"metapeft", "hf_peft", "plain", "metapeft[triton]"}  # metapeft[torch] is what auto ran
    assert vit["metapeft"]["backends_ran"] == "torch"
    assert vit["metapeft[triton]"]["backends_ran"] == "triton"  # the Triton interpreter ran the whole step
    assert all(row["loss_check"] == "ok" for name, row in vit.items() if name != "hf_peft")
    assert [row["contender"] for row in stages["meta_step"]["rows"]] == [
        "plain_step", "first_order", "finite_difference", "exact", "naive_exact"]
    adapter_rows = stages["adapters"]["rows"]
    assert {row["kind"] for row in adapter_rows} == {"parallel", "sequential"}
    assert all(f"{name}_ms" in row for row in adapter_rows for name in ("plain", "fused[torch]", "fused[triton]"))
    assert set(record["headline_ratios"]) == {"op_bench", "vit_step", "meta_step", "adapters"}
    assert stages["gpu_tests"]["counts"]["skipped"] > 0 and stages["gpu_tests"]["counts"]["failed"] == 0
    assert record["recommendation_files"] == [str(tmp_path / "out" / "gpu_default.json")]
    assert gpu_check.DRY_RUN_NOTE in (tmp_path / "out" / "gpu_check.md").read_text()
    assert not (tmp_path / "cache").exists()
    assert sorted(p.name for p in gpu_check.RESULTS_DIR.iterdir()) == results
