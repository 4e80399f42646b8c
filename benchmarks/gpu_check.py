"""One GPU check (one H200, at most 8 minutes): build metapeft._C, run every gpu test, run the GPU benchmark, record.

Run from a source checkout: ``python benchmarks/gpu_check.py`` (``--quick``: the benchmark's two tiny cases;
``--budget-s``: the whole check's wall-clock limit, default 480). Steps, each bounded by what is left of the budget:
1. ``build``: ``METAPEFT_BUILD_CUDA=1 python setup.py build_ext --inplace`` for this GPU's architecture only;
2. ``gpu tests``: ``python -m pytest -m gpu`` (every test marked ``gpu``, slow ones included), counted from its
   JUnit XML;
3. ``benchmark``: ``python benchmarks/bench_scaled_lora_gpu.py`` (which records
   ``benchmarks/results/scaled_lora_gpu.{json,md}`` and checks every contender against the fp32 reference).
Then ``benchmarks/results/gpu_check.{json,md}`` get a summary line (pass/fail counts, headline ratios) and
``cuda_default_backend``: of the fused scaled-LoRA backends (``torch``, ``triton``, ``cuda``) that the benchmark
timed and whose gpu tests all passed, the one with the lowest geometric-mean fwd+bwd time over every benchmarked
case. The same choice goes to ``metapeft/ops/gpu_default.json``, shipped with the package, from which "auto" picks
the CUDA default (:func:`metapeft.ops.backends.recorded_cuda_default_backend`).

Without a CUDA device the check records nothing, says why and exits 0 (a CPU machine is a normal place to run the
suite, not a failure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import RESULTS_DIR, environment, markdown_table, write_atomically  # noqa: E402

FUSED_BACKENDS = ("torch", "triton", "cuda")
GPU_DEFAULT_FILE = ROOT / "metapeft" / "ops" / "gpu_default.json"  # read by metapeft.ops.backends.auto_order
LARGE_M = 4096  # the headline ratios average over M >= 4096, where the kernels, not launches, decide


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "torch has CUDA but sees no device (driver missing or CUDA_VISIBLE_DEVICES empty)"
    return None


def run_step(name: str, command: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Run ``command`` from the checkout root; its status ("passed", "failed" or "timed out"), time and output tail."""
    start = time.perf_counter()
    print(f"gpu_check: {name}: {' '.join(command)} (limit {timeout_s:.0f} s)", flush=True)
    try:
        proc = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=max(timeout_s, 1.0))
        status, output = ("passed" if proc.returncode == 0 else "failed"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as expired:
        status = "timed out"
        output = "".join(part.decode() if isinstance(part, bytes) else (part or "")
                         for part in (expired.stdout, expired.stderr))
    seconds = time.perf_counter() - start
    print(f"gpu_check: {name}: {status} in {seconds:.0f} s\n{output[-3000:]}", flush=True)
    return {"step": name, "status": status, "seconds": round(seconds, 1), "output_tail": output[-4000:]}


def junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """(counts of passed / failed / skipped tests, ids of the failed ones) from a pytest JUnit XML file."""
    counts, failed = {"passed": 0, "failed": 0, "skipped": 0}, []
    if not path.is_file():
        return counts, failed
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(test_id)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failed


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def headline(rows: list[dict], failed_tests: list[str]) -> tuple[dict, str | None, str]:
    """From the benchmark's fwd+bwd rows: per fused backend, geometric means of its speed over the plain and the
    HF PEFT contenders at M >= 4096 and of its time over the frozen base Linear; the chosen CUDA default and why."""
    fwd_bwd = [row for row in rows if row["mode"] == "fwd+bwd"]
    ratios, times = {}, {}
    for backend in FUSED_BACKENDS:
        timed = [row for row in fwd_bwd if f"{backend}_ms" in row]
        if not timed:
            continue
        large = [row for row in timed if row["M"] >= LARGE_M] or timed
        ratios[backend] = {
            "speed_vs_plain_large_M": _geomean([row["plain_ms"] / row[f"{backend}_ms"] for row in large]),
            "time_vs_base": _geomean([row[f"{backend}_ms"] / row["base_ms"] for row in timed]),
        }
        if all("hf_peft_ms" in row for row in large):
            ratios[backend]["speed_vs_hf_peft_large_M"] = _geomean([row["hf_peft_ms"] / row[f"{backend}_ms"]
                                                                    for row in large])
        times[backend] = _geomean([row[f"{backend}_ms"] for row in timed])
    qualified = {b: t for b, t in times.items() if not any(b in test_id.lower() for test_id in failed_tests)}
    if not qualified:
        return ratios, None, "no fused backend was timed with all its gpu tests passing"
    choice = min(qualified, key=qualified.get)
    reason = (f"lowest geometric-mean fwd+bwd time over {len(fwd_bwd)} cases among "
              + ", ".join(f"{b} {t:.3g} ms" for b, t in sorted(qualified.items(), key=lambda item: item[1])))
    return ratios, choice, reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock limit of the whole check")
    parser.add_argument("--quick", action="store_true", help="the benchmark's two tiny cases only")
    args = parser.parse_args()
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu_check: skipped, nothing recorded: {reason}")
        return
    deadline = time.perf_counter() + args.budget_s
    major, minor = torch.cuda.get_device_capability()
    steps = [run_step("build", [sys.executable, "setup.py", "build_ext", "--inplace"], 0.4 * args.budget_s,
                      env={"METAPEFT_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
                           "MAX_JOBS": str(os.cpu_count() or 4)})]
    junit = RESULTS_DIR / "gpu_check_junit.xml.partial"
    steps.append(run_step("gpu tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                        f"--junitxml={junit}"], 0.5 * (deadline - time.perf_counter())))
    counts, failed = junit_counts(junit)
    junit.unlink(missing_ok=True)
    left = deadline - time.perf_counter()
    bench = [sys.executable, "benchmarks/bench_scaled_lora_gpu.py", "--budget-s", f"{max(left - 90, 10):.0f}"]
    steps.append(run_step("benchmark", bench + (["--quick"] if args.quick else []), left - 5))
    rows = []
    bench_results = RESULTS_DIR / ("scaled_lora_gpu_quick.json" if args.quick else "scaled_lora_gpu.json")
    if steps[-1]["status"] == "passed" and bench_results.is_file():
        rows = json.loads(bench_results.read_text())[-1]["rows"]
    ratios, choice, choice_reason = headline(rows, failed) if rows else ({}, None, "the benchmark recorded nothing")
    summary = (f"build {steps[0]['status']}; gpu tests {counts['passed']} passed, {counts['failed']} failed, "
               f"{counts['skipped']} skipped; benchmark {steps[2]['status']} ({len(rows) // 3} cases); "
               + "; ".join(f"{b}: {r['speed_vs_plain_large_M']:.2f}x plain speed (M >= {LARGE_M}), "
                           f"{r['time_vs_base']:.2f}x base time" for b, r in ratios.items())
               + f"; cuda_default_backend = {choice}")
    record = {**environment(), "command": " ".join(["python benchmarks/gpu_check.py", *sys.argv[1:]]),
              "summary": summary, "cuda_default_backend": choice, "cuda_default_backend_reason": choice_reason,
              "gpu_tests": counts, "failed_tests": failed, "headline_ratios": ratios, "steps": steps}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_atomically(RESULTS_DIR / "gpu_check.json", json.dumps(record, indent=1) + "\n")
    provenance = {k: record[k] for k in ("device", "torch", "triton", "git_sha", "timestamp")}
    write_atomically(GPU_DEFAULT_FILE, json.dumps({"cuda_default_backend": choice, "reason": choice_reason,
                                                   "source": "benchmarks/results/gpu_check.json", **provenance},
                                                  indent=1) + "\n")
    step_rows = [{"step": s["step"], "status": s["status"], "seconds": s["seconds"]} for s in steps]
    ratio_rows = [{"backend": b, **r} for b, r in ratios.items()]
    write_atomically(RESULTS_DIR / "gpu_check.md", "\n\n".join([
        "# GPU check", ", ".join(f"{k}: {record[k]}" for k in ("device", "torch", "triton", "git_sha", "timestamp")),
        f"Command: `{record['command']}`", f"**{summary}**", markdown_table(step_rows),
        markdown_table(ratio_rows) if ratio_rows else "no benchmark rows",
        f"cuda_default_backend: `{choice}` ({choice_reason})",
        "Failed tests: " + (", ".join(failed) if failed else "none")]) + "\n")
    print(f"gpu_check: {summary}")


if __name__ == "__main__":
    main()
