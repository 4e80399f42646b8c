"""The tolerance rule (FlashAttention's): a fast path's error against a float64 oracle may be at most
twice the error of the same-dtype unfused PyTorch computation, plus a tiny floor."""

from __future__ import annotations

import torch

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_2x_rule(name: str, fast: torch.Tensor, baseline: torch.Tensor, oracle: torch.Tensor) -> None:
    """Assert ``err(fast) <= 2 * err(baseline) + floor`` against ``oracle``; report the first mismatch."""
    assert fast.shape == oracle.shape, f"{name}: shape {tuple(fast.shape)} != oracle {tuple(oracle.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values in the fast result"
    scale = max(oracle.abs().max().item(), 1.0) if oracle.numel() else 1.0
    floor = FLOOR[baseline.dtype] * scale
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
