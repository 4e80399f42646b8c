"""The ``torch`` backend of the scaled-LoRA op: the fused math of docs/design.md composed from ATen ops.

Shapes: x (M, K), weight (N, K), bias (N,) or None, lora_A (S*r, K), lora_B (N, r), scale (S,).
Segment j is the output slice ``[j*N/S, (j+1)*N/S)``; it uses rank block j of ``lora_A``.

Forward:  h = drop(x) A^T (M, S*r);  y[:, j] = x W^T[:, j] + bias[j] + scale_j * h_j B_j^T.
Backward: T_j = dY_j B_j;  d scale_j = sum(T_j * h_j);  dB_j = scale_j dY_j^T h_j;
          dA_j = scale_j T_j^T drop(x);  dx = dY W + drop'((scale T) A).
Nothing of size M x N is saved; the dropout mask is regenerated from the seed.
"""

from __future__ import annotations

import torch

from metapeft.ops.dropout import seeded_dropout, torch_dropout_factors


def _segment_view(t: torch.Tensor, segments: int) -> torch.Tensor:
    """(M, S*w) -> (S, M, w) view of a (possibly strided) 2-D tensor."""
    return t.unflatten(1, (segments, t.shape[1] // segments)).transpose(0, 1)


def scaled_lora_fwd_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y (M, N), h (M, S*r))``; one base GEMM plus S rank-r GEMMs accumulated into y in place."""
    segments = scale.shape[0]
    h = seeded_dropout(x, dropout_p, seed) @ lora_A.t()
    y = torch.nn.functional.linear(x, weight, bias)
    scaled_h = _segment_view(h, segments) * scale.to(h.dtype).view(segments, 1, 1)
    for j, y_j in enumerate(_segment_view(y, segments)):
        y_j.addmm_(scaled_h[j], lora_B[j * y_j.shape[1] : (j + 1) * y_j.shape[1]].t())
    return y, h


def scaled_lora_composite(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    dropout_p: float,
    seed: int,
    dropout_factors=torch_dropout_factors,
) -> torch.Tensor:
    """The forward from out-of-place differentiable ATen ops: the path for forward-mode AD (jvp).

    Same math as :func:`scaled_lora_fwd_torch`, with the dropout mask of ``dropout_factors`` (the
    backend whose forward this stands for); returns y (M, N).
    """
    segments = scale.shape[0]
    h = _segment_view(seeded_dropout(x, dropout_p, seed, dropout_factors) @ lora_A.t(), segments)  # (S, M, r)
    lora_B_segments = lora_B.unflatten(0, (segments, lora_B.shape[0] // segments))  # (S, N/S, r)
    lora = torch.bmm(h * scale.to(h.dtype).view(segments, 1, 1), lora_B_segments.transpose(1, 2))  # (S, M, N/S)
    return torch.nn.functional.linear(x, weight, bias) + lora.transpose(0, 1).flatten(1)


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
    segments = scale.shape[0]
    rank = lora_B.shape[1]
    out_per_segment = lora_B.shape[0] // segments
    grad_segments = _segment_view(grad_y, segments)  # (S, M, N/S)
    h_segments = _segment_view(h, segments)  # (S, M, r)
    c = scale.to(grad_y.dtype).view(segments, 1, 1)
    T = torch.bmm(grad_segments, lora_B.view(segments, out_per_segment, rank))  # (S, M, r)
    scaled_T = (T * c).transpose(0, 1).reshape(grad_y.shape[0], segments * rank)  # (M, S*r)

    dx = dweight = dbias = dA = dB = dscale = None
    if need_dscale:
        accumulate = torch.promote_types(T.dtype, torch.float32)
        dscale = (T.to(accumulate) * h_segments.to(accumulate)).sum(dim=(1, 2)).to(scale.dtype)
    if need_dB:
        dB = torch.bmm(grad_segments.transpose(1, 2), h_segments * c).reshape(lora_B.shape)
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
