"""Peak memory of one meta step against the number of look-ahead steps K, every mode, on CPU.

Run: ``python benchmarks/bench_lookahead_memory.py`` (``--quick``: a smaller ViT; ``--max-steps``, default 4).
Model and batches: those of ``bench_meta_step_ddp.py`` (ViT-Ti at 64 px, 4 blocks, LoRA r = 8, batch 32 + meta
batch 32), one process, one thread. Peak memory is the growth of the resident set during the first call in a
fresh subprocess per (mode, K), after ``malloc_trim`` returned the heap freed while building the model (glibc
keeps freed memory mapped, so a warmed-up process would hide the peak). The exact mode keeps one
double-differentiable train graph per step until its Hessian-vector product is taken, so its peak should grow
by about one train graph per step; the other modes free each step's graph before the next step.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metapeft  # noqa: E402
from benchmarks.bench_meta_step_ddp import FULL, LR, MOMENTUM, QUICK, WEIGHT_DECAY, build, classification_loss  # noqa: E402
from benchmarks.harness import cpu_peak_rss_bytes, record_results  # noqa: E402
from metapeft.meta import hypergradient  # noqa: E402


def first_call_peak(mode: str, steps: int, quick: bool) -> int:
    """Peak RSS growth of one meta step (``mode``, K = ``steps``) in this fresh process."""
    torch.set_num_threads(1)
    model, train, val, buffers = build(QUICK if quick else FULL, steps)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return cpu_peak_rss_bytes(lambda: hypergradient(
        model, classification_loss, train[0], val, lr=LR, momentum=MOMENTUM, momentum_buffers=buffers,
        weight_decay=WEIGHT_DECAY, mode=mode, lookahead_batches=train[1:]))


def peak_in_subprocess(mode: str, steps: int, quick: bool) -> int:
    command = [sys.executable, str(Path(__file__).resolve()), "--peak-of", mode, str(steps)]
    output = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True,
                            check=True).stdout
    return int(json.loads(output.strip().splitlines()[-1])["peak_rss_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 32 px, 2-block ViT: a smoke run")
    parser.add_argument("--max-steps", type=int, default=4, help="largest K measured (default 4)")
    parser.add_argument("--peak-of", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        mode, steps = args.peak_of
        print(json.dumps({"peak_rss_bytes": first_call_peak(mode, int(steps), args.quick)}))
        return
    rows = []
    for mode in metapeft.meta.MODES:
        peaks = [peak_in_subprocess(mode, k, args.quick) for k in range(1, args.max_steps + 1)]
        for k, peak in enumerate(peaks, start=1):
            rows.append({"mode": mode, "lookahead_steps": k, "peak_rss_MiB": peak / 2**20,
                         "peak / peak at K=1": peak / peaks[0]})
            print(rows[-1])
    shape = QUICK if args.quick else FULL
    options = (" --quick" if args.quick else "") + (f" --max-steps {args.max_steps}" if args.max_steps != 4 else "")
    record_results(
        "lookahead_memory" + ("_quick" if args.quick else ""), rows,
        f"Meta-step peak memory vs look-ahead steps K, CPU, 1 thread: ViT-Ti ({shape['img_size']} px, "
        f"{shape['depth']} blocks), batch 32 + meta batch 32, LoRA r=8",
        command=f"python benchmarks/bench_lookahead_memory.py{options}",
    )


if __name__ == "__main__":
    main()
