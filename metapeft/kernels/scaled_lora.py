"""Triton kernels for scaled LoRA (the ``triton`` backend): fused forward and backward.

Shapes (any M, K, N; masked tails; any strides): x (M, K), weight (N, K), bias (N,) or None,
lora_A (S*r, K), lora_B (N, r), scale (S,) (one per segment) or (N,) (one per output channel) read from device
memory inside the kernels (changing it never recompiles and never syncs the host). Segment j is the output slice
``[j*N/S, (j+1)*N/S)`` with rank block j of ``lora_A``; S = lora_A's rows / r. The kernels read the scale as a
vector over N through two strides (``stride_ss`` per segment, ``stride_sn`` per channel: (1, 0) for a per-segment
scale, (N/S, 1) for a per-channel one). fp32 / fp16 / bf16 inputs; every product accumulates in fp32.

Forward:  h = drop(x) A^T                                   (``_scaled_lora_h_kernel``, M x S*r, saved)
          y[:, j] = scale_j * h_j B_j^T + x W_j^T + bias_j  (``_scaled_lora_fwd_kernel``: the LoRA term seeds
                                                             the fp32 accumulator of the base GEMM; y stored once)
Backward: T_j = dY_j B_j;  d scale_j = sum(T_j * h_j);  cT = scale_j T_j      (``_scaled_lora_bwd_t_kernel``)
          dB_j = scale_j dY_j^T h_j                                           (``_scaled_lora_bwd_db_kernel``)
          dA = cT^T drop(x)                                                   (``_scaled_lora_bwd_da_kernel``)
          dx = drop'(cT A) + dY W   (the LoRA term seeds the accumulator)     (``_scaled_lora_bwd_dx_kernel``)
          dweight = dY^T x, dbias = sum_m dY (torch matmul/sum: the base weight is frozen in practice).
Per-channel scale c (N,): the T kernel scales B's rows before its GEMM (cT_j = dY_j (c B)_j; no d scale there),
the dB kernel's fp32 P_j = dY_j^T h_j gives dB = c P and, with B's tile, d c_n = sum_k P[n, k] B[n, k] (fp32
partials per split of M): d c costs one (N, r) reduction on the dB pass, which then also runs for d c alone.
Dropout: the kernels' shared rule (``common.py``), regenerated in backward from the seed, never stored.

Bytes moved (fp16, no dropout): forward reads x twice (h kernel + GEMM) and writes y once, the unfused
reference writes and re-reads two more M x N tensors; backward reads dY three times (T, dB, dx) and x once (dA).
Split reductions (dB, dA, d scale) write fp32 partials that torch sums: deterministic, no atomics.
dB is a second pass over dY rather than a by-product of the T pass: T reduces over N and dB over M, so one
pass must spill per-tile fp32 partials of one of them, 4r/BLOCK_M bytes per dY element written and re-read
(r = 16, BLOCK_M = 128: as many bytes as re-reading bf16 dY), which saves nothing at the ranks used (8..64).

This module knows nothing of ``metapeft``; ``metapeft/ops/triton_backend.py`` registers it as a backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, MIN_DOT, configs, dot_precision, dropout_args, keep_scale, seed_arg, tune_bench

# Rank tiles above 64 cost registers (BLOCK_M x BLOCK_R fp32 accumulators) without saving traffic.
MAX_BLOCK_R = 64
# Programs to aim for in split reductions over M (dA, dB): ~2 waves of a 132-SM H200.
TARGET_PROGRAMS = 264


# Base GEMM tiles (fwd y, bwd dx). 128x128x64/8 warps/3 stages is the Hopper (sm_90) shape of Triton's matmul
# tutorial; 128x64x32 and 64x128x32 with 4 stages fit Ampere's 164 KB of shared memory; 64x64x32 serves small M.
GEMM_CONFIGS = configs(
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8},
    [
        ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
        ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
        ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
    ],
)
# Skinny kernels: one tiled dimension is a (padded) rank, the other streams.
SKINNY_CONFIGS = configs(
    {"BLOCK_M": 128, "BLOCK_K": 128},
    [
        ({"BLOCK_M": 128, "BLOCK_K": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_K": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_K": 128}, 4, 3),
        ({"BLOCK_M": 32, "BLOCK_K": 64}, 4, 4),
    ],
)
REDUCE_CONFIGS = configs(
    {"BLOCK_M": 128},
    [
        ({"BLOCK_M": 64}, 4, 3),
        ({"BLOCK_M": 128}, 4, 3),
        ({"BLOCK_M": 32}, 4, 4),
    ],
)
T_CONFIGS = configs(
    {"BLOCK_N": 128},
    [
        ({"BLOCK_N": 64}, 4, 3),
        ({"BLOCK_N": 128}, 4, 3),
        ({"BLOCK_N": 32}, 4, 4),
    ],
)
# Untuned output tiles: the T kernel's rows (fixed so that its d-scale partials have a known count) and dB's rows.
OUT_TILE = 128 if INTERPRET else 64


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a linear program id to a (pid_m, pid_n) tile, GROUP_M row tiles at a time (L2 reuse)."""
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


@triton.autotune(configs=SKINNY_CONFIGS, key=["M", "SR", "K"], do_bench=tune_bench)
@triton.jit
def _scaled_lora_h_kernel(
    x_ptr, a_ptr, h_ptr, M, SR, K,
    stride_xm, stride_xk, stride_am, stride_ak, stride_hm, stride_hr,
    p, inv_keep, seed_ptr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h (M, SR) = drop(x) (M, K) @ A^T (K, SR); grid (cdiv(M, BLOCK_M), cdiv(SR, BLOCK_R))."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * keep_scale(seed_ptr, rm, rk, K, p, inv_keep)).to(x_ptr.dtype.element_ty)
        a_t = tl.load(a_ptr + rr[None, :] * stride_am + rk[:, None] * stride_ak,
                      mask=(rr[None, :] < SR) & (rk[:, None] < K), other=0.0)
        acc = tl.dot(x, a_t, acc, input_precision=DOT_PRECISION)
    tl.store(h_ptr + rm64[:, None] * stride_hm + rr[None, :] * stride_hr, acc.to(h_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < SR))


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N_SEG", "K", "R"], do_bench=tune_bench)
@triton.jit
def _scaled_lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, scale_ptr, y_ptr, M, N_SEG, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr, stride_bn, stride_br, stride_ym, stride_yn,
    stride_ss, stride_sn,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[:, seg j] = (h_j B_j^T) * scale[seg j] + x W_j^T + bias_j (the scale per column: strides
    ``stride_ss``, ``stride_sn``); grid (tiles of (M, N/S), S)."""
    seg = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N_SEG, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = seg * N_SEG + rn_local
    rm64 = rm.to(tl.int64)
    m_mask = rm < M
    n_mask = rn_local < N_SEG
    # The LoRA term first: it seeds the fp32 accumulator that the base GEMM then adds into.
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + rm64[:, None] * stride_hm + (seg * R + rr)[None, :] * stride_hr,
                    mask=m_mask[:, None] & (rr[None, :] < R), other=0.0)
        b_t = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                      mask=n_mask[None, :] & (rr[:, None] < R), other=0.0)
        lora = tl.dot(h, b_t, lora, input_precision=DOT_PRECISION)
    c = tl.load(scale_ptr + seg * stride_ss + rn_local * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
    acc = lora * c[None, :]
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_mask[:, None] & (rk[None, :] < K), other=0.0)
        w_t = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                      mask=n_mask[None, :] & (rk[:, None] < K), other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=T_CONFIGS, key=["M", "N_SEG", "R"], do_bench=tune_bench)
@triton.jit
def _scaled_lora_bwd_t_kernel(
    dy_ptr, b_ptr, h_ptr, scale_ptr, ct_ptr, dscale_part_ptr, M, N_SEG, R, S,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_hm, stride_hr, stride_ctm, stride_ctr,
    stride_ss, stride_sn,
    PER_CHANNEL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """T_j = dY_j B_j; stores cT = scale_j T_j (M, S*R) and partial sums of T_j * h_j. ``PER_CHANNEL``: stores
    cT_j = dY_j (c B)_j (B's rows scaled before the GEMM) and no partial sums.

    Grid (cdiv(M, BLOCK_M), S, cdiv(R, BLOCK_R)); partial (pid_m, pid_r, j) goes to
    ``dscale_part[(pid_m * cdiv(R, BLOCK_R) + pid_r) * S + j]`` (fp32).
    """
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    pid_r = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rm64 = rm.to(tl.int64)
    m_mask = rm < M
    r_mask = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N_SEG, BLOCK_N):
        rn_local = n0 + tl.arange(0, BLOCK_N)
        rn = seg * N_SEG + rn_local
        dy = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=m_mask[:, None] & (rn_local[None, :] < N_SEG), other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=(rn_local[:, None] < N_SEG) & r_mask[None, :], other=0.0)
        if PER_CHANNEL:
            c = tl.load(scale_ptr + seg * stride_ss + rn_local * stride_sn, mask=rn_local < N_SEG, other=0.0)
            b = (b.to(tl.float32) * c.to(tl.float32)[:, None]).to(b_ptr.dtype.element_ty)
        acc = tl.dot(dy, b, acc, input_precision=DOT_PRECISION)
    tile_mask = m_mask[:, None] & r_mask[None, :]
    if PER_CHANNEL:
        ct = acc
    else:
        h = tl.load(h_ptr + rm64[:, None] * stride_hm + (seg * R + rr)[None, :] * stride_hr, mask=tile_mask,
                    other=0.0)
        partial = tl.sum(tl.sum(acc * h.to(tl.float32), axis=1), axis=0)
        tl.store(dscale_part_ptr + (pid_m * tl.num_programs(2) + pid_r) * S + seg, partial)
        ct = acc * tl.load(scale_ptr + seg * stride_ss).to(tl.float32)
    tl.store(ct_ptr + rm64[:, None] * stride_ctm + (seg * R + rr)[None, :] * stride_ctr,
             ct.to(ct_ptr.dtype.element_ty), mask=tile_mask)


@triton.autotune(configs=REDUCE_CONFIGS, key=["M", "N_SEG", "R", "SPLIT"], do_bench=tune_bench)
@triton.jit
def _scaled_lora_bwd_db_kernel(
    dy_ptr, h_ptr, b_ptr, scale_ptr, part_ptr, dscale_part_ptr, M, N_SEG, R, SPLIT,
    stride_dym, stride_dyn, stride_hm, stride_hr, stride_bn, stride_br, stride_ss, stride_sn,
    stride_ps, stride_pn, stride_pr, stride_dss, stride_dsr,
    STORE_DSCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """part[split, seg j rows, :] = scale[rows] * (dY_j^T h_j) over split's rows of M (P_j, fp32); dB = part.sum(0).
    ``STORE_DSCALE`` (per-channel scale): also ``dscale_part[split, pid_r, rows] = sum_k P_j[rows, k] B[rows, k]``.

    Grid (cdiv(N/S, BLOCK_N) * cdiv(R, BLOCK_R), S, SPLIT).
    """
    num_r = tl.cdiv(R, BLOCK_R)
    pid_n = tl.program_id(0) // num_r
    pid_r = tl.program_id(0) % num_r
    seg = tl.program_id(1)
    split = tl.program_id(2)
    rn_local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = seg * N_SEG + rn_local
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n_mask = rn_local < N_SEG
    r_mask = rr < R
    num_blocks = tl.cdiv(M, BLOCK_M)
    blocks_per_split = tl.cdiv(num_blocks, SPLIT)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for block in range(split * blocks_per_split, tl.minimum((split + 1) * blocks_per_split, num_blocks)):
        rm = block * BLOCK_M + tl.arange(0, BLOCK_M)
        rm64 = rm.to(tl.int64)
        m_mask = rm < M
        dy_t = tl.load(dy_ptr + rm64[None, :] * stride_dym + rn[:, None] * stride_dyn,
                       mask=m_mask[None, :] & n_mask[:, None], other=0.0)
        h = tl.load(h_ptr + rm64[:, None] * stride_hm + (seg * R + rr)[None, :] * stride_hr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(dy_t, h, acc, input_precision=DOT_PRECISION)
    tile_mask = n_mask[:, None] & r_mask[None, :]
    if STORE_DSCALE:
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=tile_mask, other=0.0)
        tl.store(dscale_part_ptr + split * stride_dss + pid_r * stride_dsr + rn,
                 tl.sum(acc * b.to(tl.float32), axis=1), mask=n_mask)
    c = tl.load(scale_ptr + seg * stride_ss + rn_local * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + split * stride_ps + rn[:, None] * stride_pn + rr[None, :] * stride_pr, acc * c[:, None],
             mask=tile_mask)


@triton.autotune(configs=REDUCE_CONFIGS, key=["M", "SR", "K", "SPLIT"], do_bench=tune_bench)
@triton.jit
def _scaled_lora_bwd_da_kernel(
    ct_ptr, x_ptr, part_ptr, M, SR, K, SPLIT,
    stride_ctm, stride_ctr, stride_xm, stride_xk, stride_ps, stride_pr, stride_pk,
    p, inv_keep, seed_ptr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[split] = cT^T drop(x) over split's rows of M (SR, K); dA = part.sum(0).

    Grid (cdiv(SR, BLOCK_R) * cdiv(K, BLOCK_K), SPLIT).
    """
    num_k = tl.cdiv(K, BLOCK_K)
    pid_r = tl.program_id(0) // num_k
    pid_k = tl.program_id(0) % num_k
    split = tl.program_id(1)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    r_mask = rr < SR
    k_mask = rk < K
    num_blocks = tl.cdiv(M, BLOCK_M)
    blocks_per_split = tl.cdiv(num_blocks, SPLIT)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for block in range(split * blocks_per_split, tl.minimum((split + 1) * blocks_per_split, num_blocks)):
        rm = block * BLOCK_M + tl.arange(0, BLOCK_M)
        rm64 = rm.to(tl.int64)
        m_mask = rm < M
        ct_t = tl.load(ct_ptr + rm64[None, :] * stride_ctm + rr[:, None] * stride_ctr,
                       mask=m_mask[None, :] & r_mask[:, None], other=0.0)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * keep_scale(seed_ptr, rm, rk, K, p, inv_keep)).to(x_ptr.dtype.element_ty)
        acc = tl.dot(ct_t, x, acc, input_precision=DOT_PRECISION)
    tl.store(part_ptr + split * stride_ps + rr[:, None] * stride_pr + rk[None, :] * stride_pk, acc,
             mask=r_mask[:, None] & k_mask[None, :])


@triton.autotune(configs=GEMM_CONFIGS, key=["M", "N", "K", "SR"], do_bench=tune_bench)
@triton.jit
def _scaled_lora_bwd_dx_kernel(
    dy_ptr, w_ptr, ct_ptr, a_ptr, dx_ptr, M, N, K, SR,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ctm, stride_ctr, stride_am, stride_ak,
    stride_dxm, stride_dxk,
    p, inv_keep, seed_ptr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx (M, K) = drop'(cT A) + dY W; grid (tiles of (M, K),). BLOCK_N tiles K here, BLOCK_K tiles N (the sum)."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    m_mask = rm < M
    k_mask = rk < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, SR, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        ct = tl.load(ct_ptr + rm64[:, None] * stride_ctm + rr[None, :] * stride_ctr,
                     mask=m_mask[:, None] & (rr[None, :] < SR), other=0.0)
        a = tl.load(a_ptr + rr[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rr[:, None] < SR) & k_mask[None, :], other=0.0)
        acc = tl.dot(ct, a, acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale(seed_ptr, rm, rk, K, p, inv_keep)
    for n0 in range(0, N, BLOCK_K):
        rn = n0 + tl.arange(0, BLOCK_K)
        dy = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=m_mask[:, None] & (rn[None, :] < N), other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                    mask=(rn[:, None] < N) & k_mask[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + rm64[:, None] * stride_dxm + rk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & k_mask[None, :])


def _rank_block(width: int) -> int:
    """Tile for a rank dimension of ``width``: a power of two in [MIN_DOT, MAX_BLOCK_R]."""
    return min(MAX_BLOCK_R, max(MIN_DOT, triton.next_power_of_2(width)))


def _scale_strides(scale: torch.Tensor, S: int, N: int) -> tuple[int, int]:
    """(stride per segment, stride per channel) reading ``scale`` as a vector over the N outputs: (1, 0) for a
    per-segment scale (S,), (N/S, 1) for a per-channel one (N,) (at N == S the two read the same values)."""
    if scale.shape[0] == S:
        return scale.stride(0), 0
    return (N // S) * scale.stride(0), scale.stride(0)


def _split(tiles: int, M: int) -> int:
    """How many slices of M a split reduction uses: enough programs to fill the GPU, >= 256 rows a slice."""
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, max(tiles, 1)), triton.cdiv(M, 256)))


def _check_shapes(x, weight, lora_A, lora_B, scale) -> tuple[int, int, int, int, int]:
    """(M, K, N, S, r) after checking that the operands fit together (scale (S,) or (N,))."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    M, K = x.shape
    N, r = weight.shape[0], lora_B.shape[1]
    S = lora_A.shape[0] // max(r, 1)
    if (r < 1 or S < 1 or weight.shape[1] != K or tuple(lora_A.shape) != (S * r, K) or lora_B.shape[0] != N or N % S
            or scale.dim() != 1 or scale.shape[0] not in (S, N)):
        raise ValueError(f"inconsistent shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}, scale {tuple(scale.shape)}")
    return M, K, N, S, r


def scaled_lora_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y (M, N), h (M, S*r))`` in x's dtype; x, weight, bias, lora_A, lora_B share dtype and device."""
    M, K, N, S, r = _check_shapes(x, weight, lora_A, lora_B, scale)
    p, inv_keep, has_dropout = dropout_args(dropout_p, M, K)
    precision = dot_precision(x)
    h = torch.empty((M, S * r), dtype=x.dtype, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_sr = _rank_block(S * r)

    def h_grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(S * r, block_sr)

    _scaled_lora_h_kernel[h_grid](
        x, lora_A, h, M, S * r, K, *x.stride(), *lora_A.stride(), *h.stride(), p, inv_keep, seed_arg(seed, x),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=precision, BLOCK_R=block_sr,
    )

    def fwd_grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N // S, meta["BLOCK_N"]), S

    _scaled_lora_fwd_kernel[fwd_grid](
        x, weight, bias if bias is not None else y, h, lora_B, scale, y, M, N // S, K, r,
        *x.stride(), *weight.stride(), *h.stride(), *lora_B.stride(), *y.stride(), *_scale_strides(scale, S, N),
        HAS_BIAS=bias is not None, DOT_PRECISION=precision, BLOCK_R=_rank_block(r),
    )
    return y, h


def scaled_lora_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    h: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | int | None,
    needs: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, dweight, dbias, dA, dB, dscale)`` from grad_y (M, N) and the forward's h (M, S*r).

    Entries whose ``needs`` flag is False are None; dscale has scale's dtype, the rest x's dtype.
    """
    need_dx, need_dweight, need_dbias, need_dA, need_dB, need_dscale = needs
    M, K, N, S, r = _check_shapes(x, weight, lora_A, lora_B, scale)
    if tuple(grad_y.shape) != (M, N) or tuple(h.shape) != (M, S * r):
        raise ValueError(f"grad_y must be ({M}, {N}) and h ({M}, {S * r}), got {tuple(grad_y.shape)}, "
                         f"{tuple(h.shape)}")
    p, inv_keep, has_dropout = dropout_args(dropout_p, M, K)
    precision = dot_precision(x)
    n_seg = N // S
    block_r = _rank_block(r)
    num_r = triton.cdiv(r, block_r)
    scale_strides = _scale_strides(scale, S, N)
    per_channel = scale.shape[0] != S
    dx = dweight = dbias = dA = dB = dscale = None

    if need_dx or need_dA or (need_dscale and not per_channel):
        ct = torch.empty((M, S * r), dtype=x.dtype, device=x.device)
        dscale_part = torch.empty((triton.cdiv(M, OUT_TILE) * num_r, S), dtype=torch.float32, device=x.device)
        _scaled_lora_bwd_t_kernel[(triton.cdiv(M, OUT_TILE), S, num_r)](
            grad_y, lora_B, h, scale, ct, dscale_part, M, n_seg, r, S,
            *grad_y.stride(), *lora_B.stride(), *h.stride(), *ct.stride(), *scale_strides,
            PER_CHANNEL=per_channel, DOT_PRECISION=precision, BLOCK_M=OUT_TILE, BLOCK_R=block_r,
        )
        if need_dscale and not per_channel:
            dscale = dscale_part.sum(dim=0).to(scale.dtype)
    if need_dB or (need_dscale and per_channel):
        tiles = triton.cdiv(n_seg, OUT_TILE) * num_r
        split = _split(tiles * S, M)
        part = torch.empty((split, N, r), dtype=torch.float32, device=x.device)
        store_dscale = need_dscale and per_channel
        dscale_part = torch.empty((split, num_r, N) if store_dscale else (1, 1, 1), dtype=torch.float32,
                                  device=x.device)
        _scaled_lora_bwd_db_kernel[(tiles, S, split)](
            grad_y, h, lora_B, scale, part, dscale_part, M, n_seg, r, split, *grad_y.stride(), *h.stride(),
            *lora_B.stride(), *scale_strides, *part.stride(), *dscale_part.stride()[:2],
            STORE_DSCALE=store_dscale, DOT_PRECISION=precision, BLOCK_N=OUT_TILE, BLOCK_R=block_r,
        )
        if need_dB:
            dB = part.sum(dim=0).to(x.dtype)
        if store_dscale:
            dscale = dscale_part.sum(dim=(0, 1)).to(scale.dtype)
    if need_dA:
        block_sr = _rank_block(S * r)
        block_k = min(128, max(MIN_DOT, triton.next_power_of_2(K)))
        tiles = triton.cdiv(S * r, block_sr) * triton.cdiv(K, block_k)
        split = _split(tiles, M)
        part = torch.empty((split, S * r, K), dtype=torch.float32, device=x.device)
        _scaled_lora_bwd_da_kernel[(tiles, split)](
            ct, x, part, M, S * r, K, split, *ct.stride(), *x.stride(), *part.stride(), p, inv_keep,
            seed_arg(seed, x),
            HAS_DROPOUT=has_dropout, DOT_PRECISION=precision, BLOCK_R=block_sr, BLOCK_K=block_k,
        )
        dA = part.sum(dim=0).to(x.dtype)
    if need_dx:
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device)

        def dx_grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

        _scaled_lora_bwd_dx_kernel[dx_grid](
            grad_y, weight, ct, lora_A, dx, M, N, K, S * r,
            *grad_y.stride(), *weight.stride(), *ct.stride(), *lora_A.stride(), *dx.stride(), p, inv_keep,
            seed_arg(seed, x),
            HAS_DROPOUT=has_dropout, DOT_PRECISION=precision, BLOCK_R=_rank_block(S * r),
        )
    if need_dweight:
        dweight = grad_y.t() @ x
    if need_dbias:
        dbias = grad_y.sum(dim=0)
    return dx, dweight, dbias, dA, dB, dscale
