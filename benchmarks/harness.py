"""The one benchmark harness: timing, memory and result recording shared by every benchmark script.

Rules (docs/design.md, "Measuring"): ratios are measured side by side in one run, medians after warm-up,
peak memory beside time; results are appended (with device, versions and git sha) under
``benchmarks/results/`` as JSON, and the latest run is rendered as a markdown table.

Why not pytest-benchmark: it times one contender's rounds back to back, so load that changes during a run (this
machine is shared) lands on one contender and skews the ratio; here the contenders alternate round by round and
process CPU time is recorded beside wall time.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


@dataclass
class Timing:
    """Medians and interquartile ranges, in seconds, of one contender's timed calls: wall time and this process's
    CPU time (the steadier measure on a shared, oversubscribed machine when the work runs on one thread)."""

    wall_s: float
    wall_iqr_s: float
    cpu_s: float
    cpu_iqr_s: float


def _median_iqr(values: list[float]) -> tuple[float, float]:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return statistics.median(values), quartiles[2] - quartiles[0]


def interleaved_timings(contenders: dict[str, Callable[[], object]], warmup: int = 3, reps: int = 10
                        ) -> dict[str, Timing]:
    """Time ``reps`` calls of each contender after ``warmup`` calls, interleaving the contenders round by round
    so that a noisy, shared machine slows them alike; returns name -> :class:`Timing`."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    return {name: Timing(*_median_iqr(wall[name]), *_median_iqr(cpu[name])) for name in contenders}


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes autograd saves for backward while running ``fn()`` (unique storages, leaf parameters included
    only once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _vm_kib(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}; peak RSS needs Linux")
    return int(match.group(1))


def cpu_peak_rss_bytes(fn: Callable[[], object]) -> int:
    """Growth of the resident-set high-water mark while running ``fn()`` (Linux: VmHWM reset via clear_refs)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _vm_kib("VmRSS")
    fn()
    return (_vm_kib("VmHWM") - baseline) * 1024


def gpu_bench(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> tuple[float, int]:
    """Median time in ms (``triton.testing.do_bench``) and peak CUDA memory allocated during one call, in bytes."""
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    median_ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return median_ms, peak


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        return ""


# The commit whose code this process imported: a checkout may move while a long benchmark runs.
GIT_SHA_AT_START = _git_sha()


def environment() -> dict[str, str]:
    """Device, versions, load and the git sha (of the code imported at start) stamped on every result run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "load_avg_1m": f"{os.getloadavg()[0]:.2f}",
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": GIT_SHA_AT_START,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """A markdown table of ``rows`` (columns in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a sibling temporary file, then rename it over ``path`` (no half-written results). Not
    :func:`metapeft.report.write_text`: ``gpu_check.py`` writes results before and after rebuilding ``metapeft._C``
    and must not import the package (which loads the extension) into its own process."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def record_results(name: str, rows: list[dict], title: str, command: str | None = None,
                   all_runs_in_markdown: bool = False) -> Path:
    """Append ``rows`` (stamped with :func:`environment` and ``command``, by default this process's own command
    line, e.g. ``python benchmarks/bench_x.py --threads 1``) to ``results/<name>.json`` and rewrite
    ``results/<name>.md`` with the latest run (or, with ``all_runs_in_markdown``, one table of every recorded
    run's rows, each prefixed by its git sha, time and load); prints and returns the JSON path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if command is None:
        script = Path(sys.argv[0]).resolve()
        shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
        command = " ".join(["python", str(shown), *sys.argv[1:]])
    env = environment()
    json_path = RESULTS_DIR / f"{name}.json"
    history = json.loads(json_path.read_text()) if json_path.exists() else []
    history.append({**env, "command": command, "rows": rows})
    write_atomically(json_path, json.dumps(history, indent=1) + "\n")
    header = f"# {title}\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items())
    if command:
        header += f"\n\nCommand: `{command}`"
    if all_runs_in_markdown:
        rows = [{"git_sha": run["git_sha"], "timestamp": run["timestamp"], "load_avg_1m": run.get("load_avg_1m", ""),
                 **row} for run in history for row in run["rows"]]
    write_atomically(RESULTS_DIR / f"{name}.md", header + "\n\n" + markdown_table(rows) + "\n")
    print(f"results: {json_path} and {json_path.with_suffix('.md')}", flush=True)
    return json_path
