"""The ``torch`` backend of the scaled-LoRA op: the fused math of docs/design.md composed from ATen ops.

Shapes: x (M, K), weight (N, K), bias (N,) or None, lora_A (S*r, K), lora_B (N, r), scale (S,) (one per
segment) or (N,) (one per output channel). Segment j is the output slice ``[j*N/S, (j+1)*N/S)``; it uses rank
block j of ``lora_A``. S is ``lora_A``'s rows over r (a per-channel scale is recognised by its length N != S).

Per segment, scale (S,):
  Forward:  h = drop(x) A^T (M, S*r);  y[:, j] = x W^T[:, j] + bias[j] + scale_j * h_j B_j^T.
  Backward: T_j = dY_j B_j;  d scale_j = sum(T_j * h_j);  dB_j = scale_j dY_j^T h_j;
            dA_j = scale_j T_j^T drop(x);  dx = dY W + drop'((scale T) A).
Per channel, scale (N,) = c (diag(c) scales B's rows: cB = c[:, None] * B):
  Forward:  y[:, j] = x W^T[:, j] + bias[j] + h_j (cB_j)^T.
  Backward: cT_j = dY_j cB_j;  P_j = dY_j^T h_j (N/S, r);  dB = c[:, None] * P;  d c_n = sum_k P[n, k] B[n, k];
            dA_j = cT_j^T drop(x);  dx = dY W + drop'(cT A).
  d c costs the (N, r) product P that dB needs anyway plus an (N, r) reduction: nothing of size M x N.
Nothing of size M x N is saved; the dropout mask is regenerated from the seed.
"""

from __future__ import annotations

import torch

from metapeft.ops.dropout import seeded_dropout, torch_dropout_factors


def _segment_view(t: torch.Tensor, segments: int) -> torch.Tensor:
    """(M, S*w) -> (S, M, w) view of a (possibly strided) 2-D tensor."""
    return t.unflatten(1, (segments, t.shape[1] // segments)).transpose(0, 1)


def lora_segments(lora_A: torch.Tensor, lora_B: torch.Tensor) -> int:
    """S, the number of segments: ``lora_A``'s rows (S*r) over the rank (``lora_B``'s columns)."""
    return lora_A.shape[0] // lora_B.shape[1]


def _block_diagonal(rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(N, r) B rows -> the (N, S*r) block-diagonal B whose block (j, j) is segment j's rows times ``blocks[j, j]``
    (``blocks`` (S, S) diagonal: zeros off the diagonal, exact for finite B)."""
    segments, rank = blocks.shape[0], rows.shape[1]
    return (rows.reshape(segments, -1, 1, rank) * blocks.view(segments, 1, segments, 1)).reshape(rows.shape[0],
                                                                                                segments * rank)


def scaled_lora_fwd_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    dropout_p: float,
    seed: int,
    dropout_factors=torch_dropout_factors,
    factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y (M, N), h (M, S*r))`` for the scale ``factor * scale``: the base GEMM, then one rank-space GEMM
    accumulated onto it (``factor``, a Python float such as alpha / r, rides on that GEMM's ``alpha``: no
    autograd node of its own).

    The one differentiable torch forward of the op: the torch backend's forward and, with another backend's
    ``dropout_factors``, the path of double backward, forward-mode AD and ``torch.func`` transforms. Every op is
    out of place (``vmap`` over the modulator alone batches the output), nothing of size M x N is kept but y.
    The scale multiplies B (N, r), not h (M, r): fewer elements whenever M > N (ViT-B: M = 12608 tokens at
    batch 64, N <= 2304), and autograd keeps h alone rather than h and a scaled copy of it. At S > 1 the LoRA
    GEMM runs on a block-diagonal (N, S*r) B: one addmm over S*r columns instead of S segment GEMMs writing
    into strided slices of y (the base GEMM dominates: K >> S*r). B is masked into its blocks and scaled by
    one broadcast multiply with ``diag(scale)``, exact (times c_j or 0) for finite B. A per-channel scale (N,)
    multiplies B's rows the same way (``c[:, None] * B``) before the block-diagonal arrangement.
    """
    segments = lora_segments(lora_A, lora_B)
    h = torch.nn.functional.linear(seeded_dropout(x, dropout_p, seed, dropout_factors), lora_A)
    c = scale if scale.dtype == h.dtype else scale.to(h.dtype)
    if c.shape[0] != segments:  # per channel
        scaled_B = lora_B * c.unsqueeze(1)
        if segments > 1:
            scaled_B = _block_diagonal(scaled_B, torch.eye(segments, dtype=c.dtype, device=c.device))
    elif segments == 1:
        scaled_B = lora_B * c
    else:
        scaled_B = _block_diagonal(lora_B, torch.diag_embed(c))  # c_j on block (j, j), zeros elsewhere
    return torch.addmm(torch.nn.functional.linear(x, weight, bias), h, scaled_B.t(), alpha=factor), h


def scaled_lora_bwd_torch(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    h: torch.Tensor,
    dropout_p: float,
    seed: int,
    needs: tuple[bool, bool, bool, bool, bool, bool],
    dropout_factors=torch_dropout_factors,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, dweight, dbias, dA, dB, dscale)``; entries whose ``needs`` flag is False are None.

    Built from out-of-place differentiable ops only, so calling it with grad mode on (and ``h``
    recomputed from x and A) gives a backward that can itself be differentiated (double backward);
    ``dropout_factors`` then names the mask of the backend that ran the forward.
    """
    need_dx, need_dweight, need_dbias, need_dA, need_dB, need_dscale = needs
    segments = lora_segments(lora_A, lora_B)
    c = scale if scale.dtype == grad_y.dtype else scale.to(grad_y.dtype)
    terms = _channel_terms if c.shape[0] != segments else _segment_terms
    scaled_T, dB, dscale = terms(grad_y, lora_B, scale, c, h, segments, need_dB, need_dscale)
    dx = dweight = dbias = dA = None
    if need_dA:
        dA = scaled_T.t() @ seeded_dropout(x, dropout_p, seed, dropout_factors)
    if need_dx:
        lora_term = seeded_dropout(scaled_T @ lora_A, dropout_p, seed, dropout_factors)
        dx = torch.addmm(lora_term, grad_y, weight)
    if need_dweight:
        dweight = grad_y.t() @ x
    if need_dbias:
        dbias = grad_y.sum(dim=0)
    return dx, dweight, dbias, dA, dB, dscale


def _segment_terms(grad_y, lora_B, scale, c, h, segments, need_dB, need_dscale):
    """Per-segment scale c (S,): ``(scale T (M, S*r), dB (N, r) or None, d scale (S,) or None)``."""
    if segments == 1:  # plain GEMMs: at small M the batched (S, M, r) views cost more host time than the math
        T = grad_y @ lora_B  # (M, r)
        scaled_T = T * c
    else:
        grad_segments = _segment_view(grad_y, segments)  # (S, M, N/S)
        T = torch.bmm(grad_segments, lora_B.unflatten(0, (segments, -1)))  # (S, M, r)
        scaled_T = (T * c.view(segments, 1, 1)).transpose(0, 1).reshape(grad_y.shape[0], h.shape[1])  # (M, S*r)
    dB = dscale = None
    if need_dscale and segments == 1 and T.dtype in (torch.float32, torch.float64):  # one dot, no (M, r) temp
        dscale = torch.dot(T.reshape(-1), h.reshape(-1)).reshape(1)
    elif need_dscale:  # fp16/bf16: the products and the sum in fp32
        accumulate = torch.promote_types(T.dtype, torch.float32)
        products = T.to(accumulate) * (h if segments == 1 else _segment_view(h, segments)).to(accumulate)
        dscale = products.sum(dim=(-2, -1)).reshape(segments)
    if need_dscale and dscale.dtype != scale.dtype:
        dscale = dscale.to(scale.dtype)
    if need_dB and segments == 1:
        dB = grad_y.t() @ (h * c)
    elif need_dB:
        dB = torch.bmm(grad_segments.transpose(1, 2), _segment_view(h, segments) * c.view(segments, 1, 1))
        dB = dB.reshape(lora_B.shape)
    return scaled_T, dB, dscale


def _channel_terms(grad_y, lora_B, scale, c, h, segments, need_dB, need_dscale):
    """Per-channel scale c (N,): ``(cT (M, S*r), dB (N, r) or None, d c (N,) or None)`` with cB = c[:, None] * B,
    cT_j = dY_j cB_j, P_j = dY_j^T h_j, dB = c[:, None] * P and d c = rowsum(P * B). P is computed in fp32 for
    fp16/bf16 inputs when d c is needed (from an fp32 copy of dY, as the adapter's d scale): a P rounded to 8-11
    mantissa bits before the reduction over r loses d c's accuracy."""
    c_rows = c.unsqueeze(1)
    scaled_B = lora_B * c_rows
    if segments == 1:
        scaled_T = grad_y @ scaled_B
    else:
        grad_segments = _segment_view(grad_y, segments)  # (S, M, N/S)
        scaled_T = torch.bmm(grad_segments, scaled_B.unflatten(0, (segments, -1)))  # (S, M, r)
        scaled_T = scaled_T.transpose(0, 1).reshape(grad_y.shape[0], h.shape[1])  # (M, S*r)
    if not (need_dB or need_dscale):
        return scaled_T, None, None
    accumulate = torch.promote_types(grad_y.dtype, torch.float32) if need_dscale else grad_y.dtype
    grad_acc, h_acc = grad_y.to(accumulate), h.to(accumulate)
    if segments == 1:
        P = grad_acc.t() @ h_acc  # (N, r)
    else:
        P = torch.bmm(_segment_view(grad_acc, segments).transpose(1, 2), _segment_view(h_acc, segments))
        P = P.reshape(lora_B.shape)
    dB = (P * c_rows.to(accumulate)).to(lora_B.dtype) if need_dB else None
    dscale = (P * lora_B.to(accumulate)).sum(dim=1).to(scale.dtype) if need_dscale else None
    return scaled_T, dB, dscale
