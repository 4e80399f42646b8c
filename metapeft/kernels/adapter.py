"""Triton kernels for the scaled adapter (the ``triton`` backend): row-fused forward and backward.

Shapes (any M, D; masked tails; any strides): x (M, D), residual (M, D) or None (the residual is x),
down_weight (b, D), down_bias (b,) or None, up_weight (D, b), up_bias (D,) or None, scale (1,) or (D,) (one per
output channel) read from device memory inside the kernels as a vector over D with stride ``stride_sd`` (0 for
(1,); changing it never recompiles and never syncs the host); 1 <= b <= 256.
fp32 / fp16 / bf16 inputs; every product accumulates in fp32. ``activation``: "relu" or "gelu" (exact, erf).

Forward (``_adapter_fwd_kernel``, one program per BLOCK_M rows; the bottleneck row block stays in registers):
    z = drop(x) down^T + down_b  (stored in x's dtype, saved for backward);  a = act(z)
    out = residual + scale * (a up^T + up_b)   (bias, scale and residual fused into the GEMM epilogue)
Backward (``_adapter_bwd_kernel``, one program per BLOCK_M rows):
    G = dOut up (fp32 registers);  d scale partial = sum(G * a) + sum_m dOut_m . up_b   (fp32, never rounded)
    column sums of dOut (fp32 partials, for d up_b);  dz = scale G * act'(z) and a = act(z) (stored)
    dx = drop'(dz down) [+ dOut when the residual is x]
  then torch GEMMs for the weight gradients, which reduce over M:  d up = scale dOut^T a,  d down = dz^T drop(x);
  d up_b = scale * (sum of the partials), d down_b = sum_m dz_m.
  Per-channel scale c (D,) (``PER_CHANNEL``): G = (dOut * c) up, dz = G * act'(z), and d c's per-column partials
  sum_m dOut * (a up^T + up_b) (fp32; one more (BLOCK_M, BLOCK_D) GEMM tile per D tile, the forward's up projection
  recomputed) in a (grid, D) buffer; d up = c[:, None] dOut^T a, d up_b = c * (column sums).
Dropout: the kernels' shared rule (``common.py``), the scaled-LoRA kernels' mask; regenerated in backward,
never stored (d down materialises drop(x) transiently).

Bytes moved (fp16, no dropout; M x D tensors only): the forward reads x twice (the second read, BLOCK_M rows
back, mostly hits L2) and the residual once and writes out once; the unfused reference also writes and re-reads
the up projection and its scaled copy (4 more M x D passes). The backward kernel reads dOut twice (again L2 for
the second) and writes dx; the torch GEMMs read dOut and x once each. The row-parallel grid has cdiv(M, BLOCK_M)
programs: at ViT-B/16 batch 64 (M = 12608) that is 197 programs of 64 rows, 1.5 waves on a 132-SM H200.
Tile sizes are chosen from ptxas register/spill reports for sm_90a (see the constants), not from GPU timings;
BLOCK_D and the warp count are autotuned.

This module knows nothing of ``metapeft``; ``metapeft/ops/triton_backend.py`` registers it as a backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INTERPRET,
    MIN_DOT,
    configs,
    dot_precision,
    dropout_args,
    dropout_mask,
    keep_scale,
    seed_arg,
    tune_bench,
)

# The bottleneck row block lives in registers: (BLOCK_M, next_pow2(b)) fp32 accumulators.
MAX_BOTTLENECK = 256
# Rows per program, fixed per launch (so that the backward's d-scale partials have a known count): 64 rows up to
# a 64-wide bottleneck tile, 32 above. ptxas -v for sm_90a (bf16, gelu, dropout on, BLOCK_D 64, 8 warps): 64 rows
# spill 28 B (bwd) at b = 128 and 2 KB at b = 256, 32 rows spill 0 B at b = 128 and 84 B at b = 256; at b <= 64,
# 64 rows with 8 warps spill nothing (4 warps spill 412 B in bwd, so the autotuner also sees 8). The interpreter
# costs ~0.1 s per program and little per element, hence 128 rows there.
WIDE_BOTTLENECK_BLOCK = 64
ACTIVATIONS = {"relu": 0, "gelu": 1}


# BLOCK_D x warps (8 warps keep b <= 64 spill-free at 64 rows; see WIDE_BOTTLENECK_BLOCK).
CONFIGS = configs({"BLOCK_D": 128}, [({"BLOCK_D": d}, w, s) for d in (64, 128) for w, s in ((4, 3), (8, 2))])


@triton.jit
def _act(z, ACTIVATION: tl.constexpr):
    """act(z) in fp32: relu, or gelu(z) = z * Phi(z) (exact, erf)."""
    if ACTIVATION == 0:
        return tl.maximum(z, 0.0)
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _act_grad(z, ACTIVATION: tl.constexpr):
    """act'(z) in fp32: 1[z > 0], or Phi(z) + z * phi(z)."""
    if ACTIVATION == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)


@triton.autotune(configs=CONFIGS, key=["D", "B"], do_bench=tune_bench)
@triton.jit
def _adapter_fwd_kernel(
    x_ptr, res_ptr, dw_ptr, db_ptr, uw_ptr, ub_ptr, scale_ptr, z_ptr, out_ptr, M, D, B,
    stride_xm, stride_xd, stride_rm, stride_rd, stride_dwb, stride_dwd, stride_uwd, stride_uwb,
    stride_zm, stride_zb, stride_om, stride_od, stride_sd,
    p, inv_keep, seed_ptr,
    HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """z (M, B) and out (M, D) = res + scale * (act(z) up^T + up_b); grid (cdiv(M, BLOCK_M),)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rb = tl.arange(0, BLOCK_B)
    rm64 = rm.to(tl.int64)
    m_mask = rm < M
    b_mask = rb < B
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rd[None, :] * stride_xd,
                    mask=m_mask[:, None] & (rd[None, :] < D), other=0.0)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * keep_scale(seed_ptr, rm, rd, D, p, inv_keep)).to(x_ptr.dtype.element_ty)
        dw_t = tl.load(dw_ptr + rb[None, :] * stride_dwb + rd[:, None] * stride_dwd,
                       mask=b_mask[None, :] & (rd[:, None] < D), other=0.0)
        acc = tl.dot(x, dw_t, acc, input_precision=DOT_PRECISION)
    if HAS_DOWN_BIAS:
        acc += tl.load(db_ptr + rb, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    # z is rounded to the storage dtype before the activation, so that backward (which reads the stored z)
    # differentiates exactly the activation the forward applied.
    z = acc.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + rm64[:, None] * stride_zm + rb[None, :] * stride_zb, z, mask=m_mask[:, None] & b_mask[None, :])
    a = _act(z.to(tl.float32), ACTIVATION).to(uw_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_mask = rd < D
        c = tl.load(scale_ptr + rd * stride_sd, mask=d_mask, other=0.0).to(tl.float32)
        up_t = tl.load(uw_ptr + rd[None, :] * stride_uwd + rb[:, None] * stride_uwb,
                       mask=d_mask[None, :] & b_mask[:, None], other=0.0)
        delta = tl.dot(a, up_t, input_precision=DOT_PRECISION)
        if HAS_UP_BIAS:
            delta += tl.load(ub_ptr + rd, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        tile = m_mask[:, None] & d_mask[None, :]
        res = tl.load(res_ptr + rm64[:, None] * stride_rm + rd[None, :] * stride_rd, mask=tile, other=0.0)
        out = res.to(tl.float32) + c[None, :] * delta
        tl.store(out_ptr + rm64[:, None] * stride_om + rd[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=tile)


@triton.autotune(configs=CONFIGS, key=["D", "B"], do_bench=tune_bench)
@triton.jit
def _adapter_bwd_kernel(
    dout_ptr, z_ptr, dw_ptr, uw_ptr, ub_ptr, scale_ptr, dz_ptr, a_ptr, dx_ptr, dscale_part_ptr, colsum_part_ptr,
    M, D, B, stride_gm, stride_gd, stride_zm, stride_zb, stride_dwb, stride_dwd, stride_uwd, stride_uwb,
    stride_dzm, stride_dzb, stride_am, stride_ab, stride_dxm, stride_dxd, stride_sd,
    p, inv_keep, seed_ptr,
    HAS_UP_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, RESIDUAL_IS_X: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_COLSUM: tl.constexpr, PER_CHANNEL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """dz, a = act(z), dx, and the d-scale partial and dOut column sums (row pid of the (grid, D) colsum_part) of
    this program's rows; ``PER_CHANNEL``: the d-scale partials per column (row pid of a (grid, D) dscale_part);
    grid (cdiv(M, BLOCK_M),)."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rb = tl.arange(0, BLOCK_B)
    rm64 = rm.to(tl.int64)
    m_mask = rm < M
    b_mask = rb < B
    tile = m_mask[:, None] & b_mask[None, :]
    z = tl.load(z_ptr + rm64[:, None] * stride_zm + rb[None, :] * stride_zb, mask=tile, other=0.0).to(tl.float32)
    a = _act(z, ACTIVATION)
    G = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    g_bias = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_mask = rd < D
        dout = tl.load(dout_ptr + rm64[:, None] * stride_gm + rd[None, :] * stride_gd,
                       mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        up = tl.load(uw_ptr + rd[:, None] * stride_uwd + rb[None, :] * stride_uwb,
                     mask=d_mask[:, None] & b_mask[None, :], other=0.0)
        if PER_CHANNEL:  # d c per column from the recomputed up projection; c folded into dOut for G
            delta = tl.dot(a.to(uw_ptr.dtype.element_ty), tl.trans(up), input_precision=DOT_PRECISION)
            if HAS_UP_BIAS:
                delta += tl.load(ub_ptr + rd, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(dscale_part_ptr + pid * D + rd, tl.sum(dout.to(tl.float32) * delta, axis=0), mask=d_mask)
            c = tl.load(scale_ptr + rd * stride_sd, mask=d_mask, other=0.0).to(tl.float32)
            G = tl.dot((dout.to(tl.float32) * c[None, :]).to(dout_ptr.dtype.element_ty), up, G,
                       input_precision=DOT_PRECISION)
        else:
            G = tl.dot(dout, up, G, input_precision=DOT_PRECISION)
            if HAS_UP_BIAS:
                up_b = tl.load(ub_ptr + rd, mask=d_mask, other=0.0).to(tl.float32)
                g_bias += tl.sum(dout.to(tl.float32) * up_b[None, :], axis=1)
        if NEED_COLSUM:
            tl.store(colsum_part_ptr + pid * D + rd, tl.sum(dout.to(tl.float32), axis=0), mask=d_mask)
    tl.store(a_ptr + rm64[:, None] * stride_am + rb[None, :] * stride_ab, a.to(a_ptr.dtype.element_ty), mask=tile)
    if PER_CHANNEL:
        dz = (G * _act_grad(z, ACTIVATION)).to(dz_ptr.dtype.element_ty)
    else:
        tl.store(dscale_part_ptr + pid, tl.sum(tl.sum(G * a, axis=1) + g_bias, axis=0))
        dz = (G * tl.load(scale_ptr).to(tl.float32) * _act_grad(z, ACTIVATION)).to(dz_ptr.dtype.element_ty)
    tl.store(dz_ptr + rm64[:, None] * stride_dzm + rb[None, :] * stride_dzb, dz, mask=tile)
    if NEED_DX:
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_mask = rd < D
            dw = tl.load(dw_ptr + rb[:, None] * stride_dwb + rd[None, :] * stride_dwd,
                         mask=b_mask[:, None] & d_mask[None, :], other=0.0)
            dx = tl.dot(dz, dw, input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                dx = dx * keep_scale(seed_ptr, rm, rd, D, p, inv_keep)
            out_tile = m_mask[:, None] & d_mask[None, :]
            if RESIDUAL_IS_X:
                dx += tl.load(dout_ptr + rm64[:, None] * stride_gm + rd[None, :] * stride_gd, mask=out_tile,
                              other=0.0).to(tl.float32)
            tl.store(dx_ptr + rm64[:, None] * stride_dxm + rd[None, :] * stride_dxd, dx.to(dx_ptr.dtype.element_ty),
                     mask=out_tile)


def _check_shapes(x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation) -> tuple[int, int, int]:
    """(M, D, b) after checking that the operands fit together and the kernels can run them."""
    for name, t in (("x", x), ("down_weight", down_weight), ("up_weight", up_weight)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    M, D = x.shape
    B = down_weight.shape[0]
    if (down_weight.shape[1] != D or tuple(up_weight.shape) != (D, B) or tuple(scale.shape) not in ((1,), (D,))
            or (residual is not None and tuple(residual.shape) != (M, D))
            or (down_bias is not None and tuple(down_bias.shape) != (B,))
            or (up_bias is not None and tuple(up_bias.shape) != (D,))):
        raise ValueError(f"inconsistent shapes: x {tuple(x.shape)}, down_weight {tuple(down_weight.shape)}, "
                         f"up_weight {tuple(up_weight.shape)}, scale {tuple(scale.shape)}")
    if not 1 <= B <= MAX_BOTTLENECK:
        raise ValueError(f"the triton adapter kernels run bottlenecks 1..{MAX_BOTTLENECK}, got {B}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    return M, D, B


def _scale_stride(scale: torch.Tensor) -> int:
    """The kernels' stride over D of ``scale``: 0 for one scale (1,), its stride for a per-channel one (D,)."""
    return 0 if scale.shape[0] == 1 else scale.stride(0)


def _bottleneck_block(b: int) -> int:
    """Bottleneck tile: a power of two >= b and >= MIN_DOT (tl.dot needs 16)."""
    return max(MIN_DOT, triton.next_power_of_2(b))


def _row_block(block_b: int) -> int:
    """Rows per program for a bottleneck tile of ``block_b`` (see WIDE_BOTTLENECK_BLOCK)."""
    if INTERPRET:
        return 128
    return 64 if block_b <= WIDE_BOTTLENECK_BLOCK else 32


def adapter_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: torch.Tensor,
    activation: str,
    dropout_p: float,
    seed: torch.Tensor | int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out (M, D), z (M, b))`` in x's dtype; all tensor operands but scale share dtype and device."""
    M, D, B = _check_shapes(x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation)
    p, inv_keep, has_dropout = dropout_args(dropout_p, M, D)
    z = torch.empty((M, B), dtype=x.dtype, device=x.device)
    out = torch.empty((M, D), dtype=x.dtype, device=x.device)
    res = x if residual is None else residual
    block_b = _bottleneck_block(B)
    block_m = _row_block(block_b)
    _adapter_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, res, down_weight, down_bias if down_bias is not None else z, up_weight,
        up_bias if up_bias is not None else out, scale, z, out, M, D, B,
        *x.stride(), *res.stride(), *down_weight.stride(), *up_weight.stride(), *z.stride(), *out.stride(),
        _scale_stride(scale), p, inv_keep, seed_arg(seed, x),
        HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None, ACTIVATION=ACTIVATIONS[activation],
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(x), BLOCK_M=block_m, BLOCK_B=block_b,
    )
    return out, z


def adapter_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: torch.Tensor,
    z: torch.Tensor,
    activation: str,
    dropout_p: float,
    seed: torch.Tensor | int | None,
    residual_is_x: bool,
    needs: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, d down_weight, d down_bias, d up_weight, d up_bias, d scale)`` from grad_out (M, D) and the
    forward's z (M, b); None where ``needs`` is False. dx includes grad_out when ``residual_is_x``; d scale has
    scale's dtype, the rest x's dtype."""
    need_dx, need_ddown_w, need_ddown_b, need_dup_w, need_dup_b, need_dscale = needs
    M, D, B = _check_shapes(x, None, down_weight, None, up_weight, up_bias, scale, activation)
    if tuple(grad_out.shape) != (M, D) or tuple(z.shape) != (M, B):
        raise ValueError(f"grad_out must be ({M}, {D}) and z ({M}, {B}), got {tuple(grad_out.shape)}, "
                         f"{tuple(z.shape)}")
    p, inv_keep, has_dropout = dropout_args(dropout_p, M, D)
    has_up_bias = up_bias is not None
    block_b = _bottleneck_block(B)
    block_m = _row_block(block_b)
    grid = triton.cdiv(M, block_m)
    dz = torch.empty((M, B), dtype=x.dtype, device=x.device)
    a = torch.empty((M, B), dtype=x.dtype, device=x.device)
    dx = torch.empty((M, D), dtype=x.dtype, device=x.device) if need_dx else dz
    per_channel = scale.shape[0] != 1
    dscale_part = torch.empty((grid, D) if per_channel else (grid,), dtype=torch.float32, device=x.device)
    need_colsum = need_dup_b and has_up_bias
    colsum_part = torch.empty((grid, D) if need_colsum else (1,), dtype=torch.float32, device=x.device)
    _adapter_bwd_kernel[(grid,)](
        grad_out, z, down_weight, up_weight, up_bias if has_up_bias else dz, scale, dz, a, dx, dscale_part,
        colsum_part, M, D, B, *grad_out.stride(), *z.stride(), *down_weight.stride(), *up_weight.stride(),
        *dz.stride(), *a.stride(), *dx.stride(), _scale_stride(scale), p, inv_keep, seed_arg(seed, x),
        HAS_UP_BIAS=has_up_bias, ACTIVATION=ACTIVATIONS[activation], HAS_DROPOUT=has_dropout,
        RESIDUAL_IS_X=residual_is_x, NEED_DX=need_dx, NEED_COLSUM=need_colsum, PER_CHANNEL=per_channel,
        DOT_PRECISION=dot_precision(x),
        BLOCK_M=block_m, BLOCK_B=block_b,
    )
    # (D, b) GEMM on aligned operands; appending d up_b as a ones column of a would misalign it (b+1 columns).
    dup_w = (grad_out.t() @ a) * scale.to(x.dtype).unsqueeze(1) if need_dup_w else None
    dup_b = (colsum_part.sum(dim=0) * scale.to(torch.float32)).to(x.dtype) if need_colsum else None
    ddown_w = ddown_b = None
    if need_ddown_w:
        dropped = x * dropout_mask(M, D, dropout_p, seed, x.device).to(x.dtype) if has_dropout else x
        ddown_w = dz.t() @ dropped
    if need_ddown_b:
        ddown_b = dz.sum(dim=0)
    dscale = None
    if need_dscale:
        dscale = (dscale_part.sum(dim=0) if per_channel else dscale_part.sum().reshape(1)).to(scale.dtype)
    return (dx if need_dx else None), ddown_w, ddown_b, dup_w, dup_b, dscale
