"""One GPU check (one H200, at most 9 minutes): build metapeft._C, run the gpu tests and every GPU benchmark, record.

Run from a source checkout: ``python benchmarks/gpu_check.py``. Stages, in order, each in a process of its own with
its own time limit (``STAGE_LIMITS_S``, 520 s in all; ``--budget-s``, default 530 s, caps them, so that the whole
check, interpreter start included, stays within 9 minutes). A stage that fails or times out is recorded as such,
with what it reached, and the next runs:
1. ``build`` (120 s): ``METAPEFT_BUILD_CUDA=1 python setup.py build_ext --inplace`` for this GPU's architecture only;
2. ``gpu_tests`` (110 s): ``python -m pytest -m gpu -v`` (every test marked ``gpu``, slow ones included), counted
   from its JUnit XML, or from its output when stopped at the limit;
3. ``op_bench`` (60 s): ``benchmarks/bench_scaled_lora_gpu.py`` (scaled-LoRA fwd / bwd / fwd+bwd vs the frozen base
   Linear, plain PyTorch, HF PEFT; records ``scaled_lora_gpu.{json,md}``; stops starting cases 30 s before the limit);
4. ``host_overhead`` (30 s): ``benchmarks/bench_host_overhead.py --device cuda`` (per-call host time at tiny shapes
   on CUDA tensors: metapeft with "auto" and with the torch backend's C++ route vs HF PEFT and plain PyTorch; 5
   samples of 50 calls; records ``host_overhead_gpu.{json,md}``; a dry run: its ``--quick`` on CPU);
5. ``vit_step`` (90 s), 6. ``meta_step`` (75 s), 7. ``adapters`` (35 s): ``benchmarks/gpu_stages.py`` (a ViT-B/16
   bf16 training step: metapeft vs HF PEFT vs plain PyTorch; the first-order, finite-difference and exact meta
   steps vs naive ``torch.func``; ``FusedMetaAdapter`` vs a plain adapter), each rewriting a progress file after
   every contender and, when finished, appending ``<stage>_gpu.{json,md}``.
Then ``gpu_check.json`` (every run appended) and ``gpu_check.md`` (this run): a summary line (statuses, test
counts, headline ratios), each stage's status, limit, time and what it reached, the headline ratios and rows of
every stage, and ``cuda_default_backend``: of the fused scaled-LoRA backends (``torch``, ``triton``, ``cuda``) that
the op benchmark timed and whose gpu tests all passed, the one with the lowest geometric-mean fwd+bwd time. The
recommendation goes to ``gpu_default.json`` beside them, in the format of the shipped default
``metapeft/ops/gpu_default.json`` (adopting it there is a deliberate commit, never done by this script), and, on a
full run with a choice, to the user's cache (``$METAPEFT_CACHE``, else ``$XDG_CACHE_HOME/metapeft``, else
``~/.cache/metapeft``), which "auto" reads before the shipped default
(:func:`metapeft.ops.backends.recorded_default_file`). Stage logs and progress files: ``gpu_check_logs/``.
Everything goes to ``--out`` (default ``benchmarks/results/``).

Options: ``--quick`` (the op benchmark's two tiny cases; no user-cache write), ``--stages a,b`` (a subset, e.g. to
rerun one), ``--limit STAGE=SECONDS`` (override a stage's limit), ``--budget-s``. ``--dry-run``: on CPU, every stage
with tiny shapes and the Triton interpreter (build: ``setup.py --name`` only; gpu tests: ``tests/gpu``, which skip;
op benchmark: its CPU correctness step), no timing claims, nothing written outside ``--out`` (default: a fresh
temporary directory); the test suite runs it (``tests/benchmarks/test_gpu_check.py``).

Without a CUDA device (and without ``--dry-run``) the check records nothing, says why and exits 0 (a CPU machine is a
normal place to run the suite, not a failure). The parent process imports neither metapeft nor triton: the build
replaces ``metapeft._C``, which each stage's fresh process then loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import RESULTS_DIR, environment, markdown_table, write_atomically  # noqa: E402

FUSED_BACKENDS = ("torch", "triton", "cuda")
LARGE_M = 4096  # the op benchmark's headline ratios average over M >= 4096, where the kernels, not launches, decide
STAGES = ("build", "gpu_tests", "op_bench", "host_overhead", "vit_step", "meta_step", "adapters")
# Guesses for one H200 (nothing has run on one yet): the sum, 520 s, leaves 20 s of the 9 minutes for this process
# (its own start, each stage's start and kill); BUDGET_S caps the stages when --limit raises them.
STAGE_LIMITS_S = {"build": 120, "gpu_tests": 110, "op_bench": 60, "host_overhead": 30, "vit_step": 90,
                  "meta_step": 75, "adapters": 35}
BUDGET_S = 530.0
OP_BENCH_MARGIN_S = 30  # the op benchmark stops starting cases this long before its limit, to record what it timed
DRY_RUN_NOTE = "DRY RUN (CPU, tiny shapes, Triton interpreter): no timing claims"


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "torch has CUDA but sees no device (driver missing or CUDA_VISIBLE_DEVICES empty)"
    return None


def user_default_file() -> Path:
    """The user's recorded CUDA default: ``gpu_default.json`` in ``$METAPEFT_CACHE``, else
    ``$XDG_CACHE_HOME/metapeft``, else ``~/.cache/metapeft`` (the rule of
    :func:`metapeft.ops.backends.recorded_default_file`, which this process must not import)."""
    cache = os.environ.get("METAPEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "metapeft")
    return Path(cache) / "gpu_default.json"


# --------------------------------------------------------------------------------------------------------------------
# Running a stage


def run_stage(name: str, command: list[str], limit_s: float, log_dir: Path, env: dict[str, str] | None = None
              ) -> dict:
    """Run ``command`` from the checkout root in a session of its own, its output to ``log_dir/<name>.log``; at
    ``limit_s`` the whole process group is killed (a build's compilers included). Returns the stage's ``status``
    ("passed", "failed" or "timed out"), ``limit_s``, ``seconds`` and ``output_tail``."""
    log = log_dir / f"{name}.log"
    print(f"gpu_check: {name}: {' '.join(command)} (limit {limit_s:.0f} s)", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        status = "interrupted"
        try:
            status = "passed" if proc.wait(timeout=max(limit_s, 1.0)) == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timed out"
        finally:
            if proc.poll() is None or status == "timed out":
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    seconds = time.perf_counter() - start
    output = log.read_text(errors="replace")
    print(f"gpu_check: {name}: {status} in {seconds:.0f} s\n{output[-1500:]}", flush=True)
    return {"stage": name, "status": status, "limit_s": round(limit_s), "seconds": round(seconds, 1),
            "output_tail": output[-4000:]}


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


PYTEST_LINE = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)


def verbose_counts(output: str) -> tuple[dict[str, int], list[str], str | None]:
    """From ``pytest -v`` output (of a run stopped midway): counts, failed ids and the test that was running."""
    counts, failed = {"passed": 0, "failed": 0, "skipped": 0}, []
    for test_id, outcome in PYTEST_LINE.findall(output):
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "failed"}.get(outcome, "skipped")
        counts[key] += 1
        if key == "failed":
            failed.append(test_id)
    last = output.rstrip().splitlines()[-1] if output.strip() else ""
    running = last.split()[0] if "::" in last and not PYTEST_LINE.search(last) else None
    return counts, failed, running


def shown(path: Path) -> str:
    """``path`` relative to the checkout when inside it (as committed), else absolute."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# --------------------------------------------------------------------------------------------------------------------
# Headline ratios


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def headline(rows: list[dict], failed_tests: list[str]) -> tuple[dict, str | None, str]:
    """From the op benchmark's fwd+bwd rows: per fused backend, geometric means of its speed over the plain and the
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


def vit_headline(rows: list[dict]) -> dict:
    """Per contender of the ViT step: its step time and peak memory as multiples of metapeft's ("x metapeft")."""
    by_name = {row["contender"]: row for row in rows}
    ours = by_name.get("metapeft")
    if ours is None:
        return {}
    out = {}
    for name, row in by_name.items():
        if name == "metapeft":
            continue
        out[name] = {"time_x_metapeft": row["ms"] / ours["ms"]}
        if "peak_MiB" in row and "peak_MiB" in ours:
            out[name]["peak_x_metapeft"] = row["peak_MiB"] / ours["peak_MiB"]
    return out


def meta_headline(rows: list[dict]) -> dict:
    """Per meta-step mode: its time over a plain training step's and over naive ``torch.func``'s, and its peak
    memory growth over naive ``torch.func``'s."""
    by_name = {row["contender"]: row for row in rows}
    plain, naive = by_name.get("plain_step"), by_name.get("naive_exact")
    out = {}
    for name in ("first_order", "finite_difference", "exact"):
        row = by_name.get(name)
        if row is None:
            continue
        out[name] = {}
        if plain is not None:
            out[name]["time_x_plain_step"] = row["ms"] / plain["ms"]
        if naive is not None:
            out[name]["time_x_naive_exact"] = row["ms"] / naive["ms"]
            if "peak_growth_MiB" in row and "peak_growth_MiB" in naive:
                out[name]["memory_x_naive_exact"] = row["peak_growth_MiB"] / naive["peak_growth_MiB"]
    return out


def adapter_headline(rows: list[dict]) -> dict:
    """Per fused adapter backend and kind: geometric mean over M of its fwd+bwd speed over the plain adapter."""
    out: dict[str, dict[str, float]] = {}
    for row in (r for r in rows if r["mode"] == "fwd+bwd"):
        for key, value in row.items():
            if key.startswith("plain/"):
                out.setdefault(key.removeprefix("plain/"), {}).setdefault(row["kind"], []).append(value)
    return {name: {f"speed_vs_plain_{kind}": _geomean(values) for kind, values in kinds.items()}
            for name, kinds in out.items()}


def summary_line(stages: list[dict], counts: dict, ratios: dict, choice: str | None, dry_run: bool) -> str:
    """One line: every stage's status, the gpu test counts and the headline ratios."""
    parts = [f"{s['stage']} {s['status']}" for s in stages]
    parts.append(f"gpu tests {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    for backend, r in ratios.get("op_bench", {}).items():
        parts.append(f"op {backend}: {r['speed_vs_plain_large_M']:.2f}x plain speed (M >= {LARGE_M}), "
                     f"{r['time_vs_base']:.2f}x base time")
    vit = ratios.get("vit_step", {})
    for name in ("hf_peft", "plain"):
        if name in vit:
            parts.append(f"ViT step {name} {vit[name]['time_x_metapeft']:.2f}x metapeft's time"
                         + (f", {vit[name]['peak_x_metapeft']:.2f}x its peak" if "peak_x_metapeft" in vit[name]
                            else ""))
    exact = ratios.get("meta_step", {}).get("exact", {})
    if "time_x_naive_exact" in exact:
        parts.append(f"exact meta step {exact['time_x_naive_exact']:.2f}x naive torch.func time"
                     + (f", {exact['memory_x_naive_exact']:.2f}x its memory" if "memory_x_naive_exact" in exact
                        else ""))
    for name, kinds in ratios.get("adapters", {}).items():
        parts.append(f"adapter {name} " + ", ".join(f"{v:.2f}x plain speed ({k.removeprefix('speed_vs_plain_')})"
                                                     for k, v in kinds.items()))
    parts.append(f"cuda_default_backend = {choice}")
    return (f"{DRY_RUN_NOTE}; " if dry_run else "") + "; ".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# The check


def stage_commands(args, log_dir: Path, limits: dict[str, float]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """stage -> (command, extra environment) for a GPU run or, with ``args.dry_run``, a CPU dry run."""
    py, dry = sys.executable, args.dry_run
    if dry:
        build = ([py, "setup.py", "--name"], {})
    else:
        major, minor = torch.cuda.get_device_capability()
        build = ([py, "setup.py", "build_ext", "--inplace"],
                 {"METAPEFT_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
                  "MAX_JOBS": str(os.cpu_count() or 4)})
    tests = [py, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", f"--junitxml={log_dir / 'gpu_tests.xml'}"]
    op_budget = max(limits["op_bench"] - OP_BENCH_MARGIN_S, 5)
    op_bench = [py, "benchmarks/bench_scaled_lora_gpu.py", "--budget-s", f"{op_budget:.0f}"]
    host_options = ["--device", "cuda", "--reps", "5", "--calls", "50", "--label", "gpu_check"]
    host = [py, "benchmarks/bench_host_overhead.py"] + (["--quick"] if dry or args.quick else host_options)
    commands = {
        "build": build,
        "gpu_tests": (tests + (["tests/gpu"] if dry else []), {}),
        "op_bench": (op_bench + (["--quick"] if args.quick or dry else []), {}),
        "host_overhead": (host, {}),
    }
    for stage in ("vit_step", "meta_step", "adapters"):
        commands[stage] = ([py, "benchmarks/gpu_stages.py", stage, "--progress", str(log_dir / f"{stage}.json")]
                           + (["--dry-run"] if dry else []), {})
    return commands


def stage_environment(dry_run: bool, extra: dict[str, str]) -> dict[str, str]:
    """The stages' environment: this one without ``METAPEFT_BACKEND`` ("auto" must mean auto) and, on a GPU, without
    ``TRITON_INTERPRET``; a dry run hides every GPU and interprets Triton."""
    env = {k: v for k, v in os.environ.items() if k not in ("METAPEFT_BACKEND", "TRITON_INTERPRET")}
    if dry_run:
        env.update({"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
    return {**env, **extra}


def reached(stage: dict, log_dir: Path) -> dict:
    """What ``stage`` reached, from its progress file, JUnit XML or output; adds ``reached`` and stage results."""
    name, output = stage["stage"], stage["output_tail"]
    if name == "gpu_tests":
        junit = log_dir / "gpu_tests.xml"
        if junit.is_file():
            counts, failed = junit_counts(junit)
            running = None
        else:
            counts, failed, running = verbose_counts((log_dir / "gpu_tests.log").read_text(errors="replace"))
        stage.update(counts=counts, failed_tests=failed)
        stage["reached"] = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
                            + (f"; running when stopped: {running}" if running else ""))
    elif name == "op_bench":
        cases = re.findall(r"^\S+ \S+ r=\d+ M=\d+:", (log_dir / "op_bench.log").read_text(errors="replace"),
                           re.MULTILINE)
        stage["reached"] = f"{len(cases)} cases checked{' and timed' if 'ms=' in output else ''}; {last_line(output)}"
    elif name in ("vit_step", "meta_step", "adapters"):
        progress = log_dir / f"{name}.json"
        record = json.loads(progress.read_text()) if progress.is_file() else {}
        stage.update(rows=record.get("rows", []), errors=record.get("errors", {}))
        stage["reached"] = record.get("reached", f"no progress file; {last_line(output)}")
        if stage["status"] == "passed" and not record.get("done"):
            stage["status"] = "failed"
    else:
        stage["reached"] = last_line(output)
    return stage


def write_record(out_dir: Path, record: dict, dry_run: bool) -> None:
    """Append ``record`` to ``gpu_check.json`` and render it as ``gpu_check.md``."""
    json_path = out_dir / "gpu_check.json"
    history = json.loads(json_path.read_text()) if json_path.is_file() else []
    history = history if isinstance(history, list) else [history]  # the first format held one run
    write_atomically(json_path, json.dumps(history + [record], indent=1) + "\n")
    stages = record["stages"]
    sections = [
        "# GPU check" + (f" — {DRY_RUN_NOTE}" if dry_run else ""),
        ", ".join(f"{k}: {record[k]}" for k in ("device", "torch", "triton", "git_sha", "timestamp")),
        f"Command: `{record['command']}`", f"**{record['summary']}**",
        markdown_table([{k: s.get(k, "") for k in ("stage", "status", "limit_s", "seconds", "reached")}
                        for s in stages]),
    ]
    for name, ratios in record["headline_ratios"].items():
        if ratios:
            sections += [f"## Headline ratios: {name}", markdown_table([{"": k, **v} for k, v in ratios.items()])]
    for stage in stages:
        if stage.get("rows"):
            sections += [f"## {stage['stage']} rows", markdown_table(stage["rows"])]
        if stage.get("errors"):
            sections += [f"## {stage['stage']} errors", "\n".join(f"- {k}: `{v}`" for k, v in stage["errors"].items())]
    sections += [f"cuda_default_backend: `{record['cuda_default_backend']}` ({record['cuda_default_backend_reason']})",
                 "Recommendation written to: " + (", ".join(f"`{p}`" for p in record["recommendation_files"])
                                                  or "nothing"),
                 "Failed tests: " + (", ".join(record["failed_tests"]) or "none")]
    write_atomically(out_dir / "gpu_check.md", "\n\n".join(sections) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock limit of the whole check")
    parser.add_argument("--quick", action="store_true", help="the op benchmark's two tiny cases only")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, Triton interpreter: exercises every stage, claims no timing")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override one stage's time limit (repeatable)")
    parser.add_argument("--out", type=Path, help="where results go (default benchmarks/results; dry run: a temp dir)")
    args = parser.parse_args(argv)
    selected = [s for s in args.stages.split(",") if s]
    if unknown := sorted(set(selected) - set(STAGES)):
        parser.error(f"unknown stages {unknown}; choose from {STAGES}")
    limits = dict(STAGE_LIMITS_S)
    for item in args.limit:
        stage, _, seconds = item.partition("=")
        if stage not in limits:
            parser.error(f"--limit {item}: unknown stage {stage!r}")
        limits[stage] = float(seconds)
    if not args.dry_run and (reason := no_gpu_reason()) is not None:
        print(f"gpu_check: skipped, nothing recorded: {reason}")
        return 0
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_dry_run_")) if args.dry_run else RESULTS_DIR)
    log_dir = out_dir / "gpu_check_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    commands = stage_commands(args, log_dir, limits)
    stages = []
    for name in (s for s in STAGES if s in selected):
        left = deadline - time.perf_counter() - 2
        if left < 5:
            stages.append({"stage": name, "status": "not run", "limit_s": round(limits[name]), "seconds": 0,
                           "output_tail": "", "reached": f"the check's budget of {args.budget_s:.0f} s was spent"})
            continue
        for stale in (log_dir / f"{name}.json", log_dir / "gpu_tests.xml" if name == "gpu_tests" else None):
            if stale is not None:
                stale.unlink(missing_ok=True)  # a previous run's progress must not pass for this run's
        command, extra = commands[name]
        result = run_stage(name, command, min(limits[name], left), log_dir, stage_environment(args.dry_run, extra))
        stages.append(reached(result, log_dir))
    by_name = {s["stage"]: s for s in stages}
    counts = by_name.get("gpu_tests", {}).get("counts", {"passed": 0, "failed": 0, "skipped": 0})
    failed = by_name.get("gpu_tests", {}).get("failed_tests", [])
    rows = []
    bench_results = RESULTS_DIR / ("scaled_lora_gpu_quick.json" if args.quick else "scaled_lora_gpu.json")
    if not args.dry_run and by_name.get("op_bench", {}).get("status") == "passed" and bench_results.is_file():
        rows = json.loads(bench_results.read_text())[-1]["rows"]
    op_ratios, choice, choice_reason = headline(rows, failed) if rows else ({}, None, "the op benchmark recorded "
                                                                            "nothing")
    ratios = {"op_bench": op_ratios}
    for name, fn in (("vit_step", vit_headline), ("meta_step", meta_headline), ("adapters", adapter_headline)):
        try:
            ratios[name] = fn(by_name.get(name, {}).get("rows", []))
        except (KeyError, ZeroDivisionError, ValueError) as error:  # a partial row: say so, keep the rest
            ratios[name] = {"error": {"what": f"{type(error).__name__}: {error}"}}
    env = environment()
    record = {**env, "command": " ".join(["python benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
              "dry_run": args.dry_run, "summary": summary_line(stages, counts, ratios, choice, args.dry_run),
              "cuda_default_backend": choice, "cuda_default_backend_reason": choice_reason, "gpu_tests": counts,
              "failed_tests": failed, "headline_ratios": ratios, "stages": stages, "recommendation_files": []}
    provenance = {k: env[k] for k in ("device", "torch", "triton", "git_sha", "timestamp")}
    recommendation = json.dumps({"cuda_default_backend": choice, "reason": choice_reason,
                                 "source": shown(out_dir / "gpu_check.json"), **provenance}, indent=1) + "\n"
    targets = [out_dir / "gpu_default.json"]
    if not (args.dry_run or args.quick) and choice is not None:
        targets.append(user_default_file())
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, recommendation)
            record["recommendation_files"].append(str(target))
        except OSError as error:
            print(f"gpu_check: could not write {target}: {error}", flush=True)
    write_record(out_dir, record, args.dry_run)
    print(f"gpu_check: {record['summary']}\ngpu_check: results in {out_dir}/gpu_check.{{json,md}}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
