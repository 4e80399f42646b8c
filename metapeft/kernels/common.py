"""What the Triton kernel modules share (private to this package): interpreter detection, tile-config and autotune
helpers, the dot precision, and the dropout rule every kernel applies to x.

Dropout: keep element (m, k) of x (M, K) iff ``tl.rand(seed, m*K + k) >= p`` (Philox), scaled by 1/(1-p), with the
seed an int64 scalar tensor on the device that the kernels read themselves; masks
are regenerated in backward from the seed, never stored, and the scaled-LoRA and adapter kernels draw the same
mask for the same (seed, M, K). :func:`dropout_mask` materialises it for the differentiable paths and tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (CPU tests) kernels run in numpy: one config, no tuning runs, and big tiles, because the
# interpreter costs ~0.1 s per program and almost nothing per element (M=1000, N=768: 14 s at 64-tiles, ~2 s at 128).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# tl.dot needs every tile dimension >= 16: ranks below are zero-padded to this.
MIN_DOT = 16
# Philox offsets are int32 (m*K + k): dropout needs M*K < 2**31.
MAX_DROPOUT_ELEMENTS = 2**31 - 1
# Tile of the mask kernel (rows and columns).
MASK_TILE = 128 if INTERPRET else 64


def tune_bench(kernel_call, quantiles):
    """Autotuning timer: 5 ms warm-up, 25 ms of reps (a new shape tunes in well under a second)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def configs(interpret_config: dict, gpu_configs: list[tuple[dict, int, int]]) -> list[triton.Config]:
    """Tile configs: ``gpu_configs`` are (meta, num_warps, num_stages); the interpreter runs one config."""
    if INTERPRET:
        return [triton.Config(interpret_config, num_warps=4, num_stages=1)]
    return [triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in gpu_configs]


def dot_precision(x: torch.Tensor) -> str:
    """``"ieee"`` for fp32 unless torch allows TF32 matmuls on CUDA; fp16/bf16 ignore it."""
    if x.dtype == torch.float32 and (x.device.type != "cuda" or torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def dropout_args(dropout_p: float, M: int, K: int) -> tuple[float, float, bool]:
    """(p, 1/(1-p), has_dropout) for the kernels; raises if the Philox offsets would overflow int32."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and M * K > MAX_DROPOUT_ELEMENTS:
        raise ValueError(f"dropout on x needs M*K < 2**31 (int32 Philox offsets), got M={M}, K={K}")
    return float(dropout_p), 1.0 / (1.0 - dropout_p), dropout_p > 0.0


def seed_arg(seed: torch.Tensor | int | None, placeholder: torch.Tensor) -> torch.Tensor:
    """The seed pointer a launch passes: the seed (an int64 scalar tensor on the device, read there; an int is
    copied there first), or ``placeholder`` (never read) without dropout."""
    if seed is None:
        return placeholder
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor(seed, dtype=torch.int64, device=placeholder.device)


@triton.jit
def keep_scale(seed_ptr, rm, rk, K, p, inv_keep):
    """fp32 (BLOCK_M, BLOCK_K) dropout factors of x[rm, rk]: 1/(1-p) where kept, 0 where dropped. The seed is read
    from device memory (int64 at ``seed_ptr``), so a new seed never recompiles, never syncs the host and is
    fresh on every replay of a captured CUDA graph."""
    offsets = rm[:, None] * K + rk[None, :]
    return tl.where(tl.rand(tl.load(seed_ptr), offsets) >= p, inv_keep, 0.0)


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, p, inv_keep, seed_ptr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, K) fp32, contiguous: the dropout factors the other kernels apply to x."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    factors = keep_scale(seed_ptr, rm, rk, K, p, inv_keep)
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], factors, mask=(rm[:, None] < M) & (rk[None, :] < K))


def dropout_mask(M: int, K: int, dropout_p: float, seed: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """The dropout factors (M, K) fp32 the kernels apply to x for ``seed`` (see :func:`seed_arg`): 1/(1-p) where
    kept, else 0."""
    p, inv_keep, _ = dropout_args(dropout_p, M, K)
    out = torch.empty((M, K), dtype=torch.float32, device=device)
    grid = (triton.cdiv(M, MASK_TILE), triton.cdiv(K, MASK_TILE))
    _dropout_mask_kernel[grid](out, M, K, p, inv_keep, seed_arg(seed, out), BLOCK_M=MASK_TILE, BLOCK_K=MASK_TILE)
    return out
