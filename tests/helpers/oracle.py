"""The tolerance rule (FlashAttention's): a fast path's error against a float64 oracle may be at most
twice the error of the same-dtype unfused PyTorch computation, plus a tiny floor."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_2x_rule(name: str, fast: torch.Tensor, baseline: torch.Tensor, oracle: torch.Tensor,
                   floor_dtype: torch.dtype | None = None) -> None:
    """Assert ``err(fast) <= 2 * err(baseline) + floor`` against ``oracle``; report the first mismatch.

    The floor is that of the baseline's dtype, or of ``floor_dtype`` for a result computed from tensors of a
    narrower dtype than its own (the fp32 modulator gradient of an fp16 layer is a sum over fp16 activations).
    """
    assert fast.shape == oracle.shape, f"{name}: shape {tuple(fast.shape)} != oracle {tuple(oracle.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values in the fast result"
    scale = max(oracle.abs().max().item(), 1.0) if oracle.numel() else 1.0
    floor = FLOOR[floor_dtype or baseline.dtype] * scale
    err_fast, err_base = max_error(fast, oracle), max_error(baseline, oracle)
    if err_fast > 2 * err_base + floor:
        diff = (fast.double() - oracle.double()).abs()
        index = tuple(int(i) for i in torch.nonzero(diff > 2 * err_base + floor)[0])
        raise AssertionError(
            f"{name}: error {err_fast:.3e} > 2 x baseline error {err_base:.3e} + floor {floor:.1e}; "
            f"first mismatch at {index}: fast {fast[index].item():.6g} vs oracle {oracle[index].item():.6g}"
        )


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` (2-D) in a transposed, non-contiguous layout."""
    return t.t().contiguous().t()


class HostReadCounter(TorchDispatchMode):
    """Counts host reads of tensor values (``.item()`` / ``bool()``), i.e. host syncs on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def run_interpreter_suite(test_file: str) -> None:
    """Run ``test_file``'s ``interpreter``-marked tests in a child pytest with ``TRITON_INTERPRET=1`` and assert
    that every one of them ran and passed: a skip, a failure or an empty selection fails."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p", "no:cacheprovider",
               "-m", "interpreter and not slow"]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"interpreter suite failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    counts = dict((word, int(n)) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|xfailed|xpassed)",
                                                           summary))
    assert counts.get("passed", 0) > 0 and set(counts) == {"passed"}, f"not every interpreter test passed: {summary}"
