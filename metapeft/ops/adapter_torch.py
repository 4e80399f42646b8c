"""The ``torch`` backend of the adapter op: the fused adapter math composed from ATen ops.

Shapes: x (M, D), residual (M, D) or None (then the residual is x), down_weight (b, D), down_bias (b,) or
None, up_weight (D, b), up_bias (D,) or None, scale (1,) = gamma * alpha, or (D,): one per output channel.

Forward:  z = drop(x) down^T + down_b (M, b);  a = act(z);  out = residual + scale * (a up^T + up_b).
Backward: P = dOut^T a (D, b);  d up = scale P;  d up_b = scale sum_m dOut_m;
          d scale = sum(dOut * (a up^T + up_b)) = sum(P * up) + (sum_m dOut_m) . up_b;
          dz = scale (dOut up) * act'(z) (M, b);  d down = dz^T drop(x);  d down_b = sum_m dz_m;
          dx = [dOut if the residual is x] + drop'(dz down).
d scale costs one (D, b) product with the P that d up needs anyway plus a D-vector dot: nothing of size M x D
beyond the GEMMs. P and sum_m dOut_m are kept in fp32 for fp16/bf16 inputs (this backend reads an fp32 copy of
dOut for them; a kernel accumulates in fp32 anyway): rounding them, or dOut up, to 8-11 mantissa bits before
the reduction made d scale up to 4x less accurate than the unfused computation in our tests. (Appending the up
bias as a ones column to a, to get both from one GEMM, made that GEMM slower on CPU: b + 1 columns break its tiling.)
Per channel (scale c (D,)): out = residual + c * (a up^T + up_b), computed as a (c[:, None] up)^T + c up_b;
d up = c[:, None] P;  d up_b = c sum_m dOut_m;  d c = rowsum(P * up) + (sum_m dOut_m) * up_b;
dz = (dOut (c[:, None] up)) * act'(z): the same GEMMs, c on (D, b) weights instead of (M, b) activations.
Only x (alive anyway) and z (M, b) are saved; the dropout mask is regenerated once per backward from the seed
(the unfused reference stores it instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metapeft.ops.dropout import seeded_dropout, torch_dropout_factors

ADAPTER_ACTIVATIONS = ("relu", "gelu")


def adapter_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(z): ``"relu"`` or ``"gelu"`` (exact, erf-based, like ``nn.GELU()``)."""
    return F.relu(z) if activation == "relu" else F.gelu(z)


def adapter_activation_backward(grad: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(z), computed in ATen's accumulation precision and itself differentiable (double backward)."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    return torch.ops.aten.gelu_backward(grad, z)


def adapter_recompute_z(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    dropout_p: float,
    seed: int,
    dropout_factors=torch_dropout_factors,
) -> torch.Tensor:
    """z = drop(x) down^T + down_b (M, b), differentiably, with the mask of ``dropout_factors`` (the backend
    that ran the forward)."""
    return F.linear(seeded_dropout(x, dropout_p, seed, dropout_factors), down_weight, down_bias)


def adapter_fwd_torch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: torch.Tensor,
    activation: str,
    dropout_p: float,
    seed: int,
    dropout_factors=torch_dropout_factors,
    factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out (M, D), z (M, b))`` for the scale ``factor * scale``: two GEMMs, ``scale`` applied in bottleneck
    space, then the residual added with ``alpha=factor`` (a Python float such as the adapter's alpha: no autograd
    node of its own). Without dropout x and the residual may also be (..., D), giving (..., D) and (..., b).

    The one differentiable torch forward of the op: the torch backend's forward and, with another backend's
    ``dropout_factors``, the path of double backward, forward-mode AD and ``torch.func`` transforms (every op
    out of place). Scaling a (M, b) and the up bias rather than the (M, D) output means that autograd through
    it keeps nothing of size M x D for d scale either.
    """
    z = adapter_recompute_z(x, down_weight, down_bias, dropout_p, seed, dropout_factors)
    a = adapter_activation(z, activation)
    c = scale if scale.dtype == a.dtype else scale.to(a.dtype)
    scaled_bias = None if up_bias is None else up_bias * c
    if c.shape[0] == 1:
        up = F.linear(a * c, up_weight, scaled_bias)
    else:  # per channel: c scales up's rows
        up = F.linear(a, up_weight * c.unsqueeze(1), scaled_bias)
    return torch.add(x if residual is None else residual, up, alpha=factor), z


def adapter_bwd_torch(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: torch.Tensor,
    z: torch.Tensor,
    activation: str,
    dropout_p: float,
    seed: int,
    residual_is_x: bool,
    needs: tuple[bool, bool, bool, bool, bool, bool],
    dropout_factors=torch_dropout_factors,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, d down_weight, d down_bias, d up_weight, d up_bias, d scale)``; None where ``needs`` is False.

    ``dx`` includes ``grad_out`` itself when ``residual_is_x`` (the residual is x). Built from out-of-place
    differentiable ops only, so calling it with grad mode on (and ``z`` recomputed from x) gives a backward
    that can itself be differentiated (double backward).
    """
    need_dx, need_ddown_w, need_ddown_b, need_dup_w, need_dup_b, need_dscale = needs
    c = scale.to(grad_out.dtype)
    per_channel = c.shape[0] != 1
    a = adapter_activation(z, activation)

    dx = ddown_w = ddown_b = dup_w = dup_b = dscale = None
    if need_dscale or need_dup_w or need_dup_b:
        accumulate = torch.promote_types(grad_out.dtype, torch.float32)
        grad_acc, c_acc = grad_out.to(accumulate), scale.to(accumulate)
        P = grad_acc.t() @ a.to(accumulate)  # (D, b)
        grad_sum = grad_acc.sum(dim=0) if up_bias is not None and (need_dscale or need_dup_b) else None  # (D,)
        dup_w = (P * c_acc.unsqueeze(1)).to(up_weight.dtype) if need_dup_w else None
        dup_b = (grad_sum * c_acc).to(up_weight.dtype) if need_dup_b else None
        if need_dscale and per_channel:
            dscale = (P * up_weight.to(accumulate)).sum(dim=1)
            if up_bias is not None:
                dscale = dscale + grad_sum * up_bias.to(accumulate)
            dscale = dscale.to(scale.dtype)
        elif need_dscale:
            dscale = (P * up_weight.to(accumulate)).sum()
            if up_bias is not None:
                dscale = dscale + grad_sum @ up_bias.to(accumulate)
            dscale = dscale.reshape(1).to(scale.dtype)
    if need_dx or need_ddown_w or need_ddown_b:
        grad_a = grad_out @ (up_weight * c.unsqueeze(1)) if per_channel else (grad_out @ up_weight) * c
        dz = adapter_activation_backward(grad_a, z, activation)  # (M, b)
        factors = dropout_factors(x, dropout_p, seed) if dropout_p > 0.0 else None

        def drop(t: torch.Tensor) -> torch.Tensor:
            return t if factors is None else t * factors.to(t.dtype)

        if need_ddown_w:
            ddown_w = dz.t() @ drop(x)
        if need_ddown_b:
            ddown_b = dz.sum(dim=0)
        if need_dx and residual_is_x and factors is None:
            dx = torch.addmm(grad_out, dz, down_weight)
        elif need_dx:
            dx = drop(dz @ down_weight)
            dx = dx + grad_out if residual_is_x else dx
    return dx, ddown_w, ddown_b, dup_w, dup_b, dscale
