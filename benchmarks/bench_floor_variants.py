"""Could another arrangement of the LoRA math bring fwd+bwd closer to the frozen base on CPU? Two candidates, timed
side by side with ``FusedMetaLoRA`` and the base at ViT-B shapes (issue 23, "the CPU floor").

x (8*197, 768) fp32 requiring grad, ``nn.Linear(768, N)`` frozen, N in 768 / 2304 / 3072, one LoRA (S = 1) of
rank 1 / 8 / 16 with a learnable scale s (its gradient is not needed to compare the arrangements, so none computes
it). One timed call is ``f(x).backward(grad_y)``. Contenders:
- ``base``: the frozen ``nn.Linear`` alone (the floor);
- ``metapeft``: ``FusedMetaLoRA`` (the shipped math: two full GEMMs and six rank-r GEMMs);
- ``folded``: the update folded into the weight, W' = W + s B A, so forward and dx are one full GEMM each; the
  rank-space products remain only for dA = s (dY B)^T x and dB = s dY^T (x A^T);
- ``appended``: A appended to W' (one GEMM gives y and h = x A^T) and B to W' (one GEMM gives dx and dY B).
Every candidate's output and gradients are checked against ``metapeft``'s first. Medians of process CPU time,
interleaved rounds, to ``benchmarks/results/floor_variants.{json,md}``.

Run: ``python benchmarks/bench_floor_variants.py --threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metapeft  # noqa: E402
from benchmarks.harness import interleaved_timings, record_results  # noqa: E402

M, IN_FEATURES = 8 * 197, 768
OUT_FEATURES = (768, 2304, 3072)
RANKS = (1, 8, 16)


class Folded(torch.autograd.Function):
    """y = x (W + s B A)^T + b; x (M, K), W (N, K), A (r, K), B (N, r), s a float."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, s):
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.s = s
        return torch.addmm(bias, x, torch.addmm(weight, lora_B, lora_A, alpha=s).t())

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.s
        grad_x = grad_y @ torch.addmm(weight, lora_B, lora_A, alpha=s)
        grad_A = ((grad_y @ lora_B).t() @ x).mul_(s)
        grad_B = (grad_y.t() @ (x @ lora_A.t())).mul_(s)
        return grad_x, None, None, grad_A, grad_B, None


class Appended(torch.autograd.Function):
    """As :class:`Folded`, with h = x A^T from the forward GEMM over [W'; A] and dY B from the backward GEMM over
    [W', B]."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, s):
        out_features = weight.shape[0]
        y_and_h = x @ torch.cat([torch.addmm(weight, lora_B, lora_A, alpha=s), lora_A]).t()
        h = y_and_h[:, out_features:]
        ctx.save_for_backward(x, weight, lora_A, lora_B, h)
        ctx.s = s
        return y_and_h[:, :out_features].add(bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, h = ctx.saved_tensors
        s, in_features = ctx.s, weight.shape[1]
        dx_and_t = grad_y @ torch.cat([torch.addmm(weight, lora_B, lora_A, alpha=s), lora_B], dim=1)
        grad_A = (dx_and_t[:, in_features:].t() @ x).mul_(s)
        grad_B = (grad_y.t() @ h).mul_(s)
        return dx_and_t[:, :in_features], None, None, grad_A, grad_B, None


def measure(out_features: int, rank: int, reps: int) -> dict:
    """One row: CPU medians (ms) of the four contenders and their ratios to the base."""
    torch.manual_seed(0)
    layer = metapeft.FusedMetaLoRA(nn.Linear(IN_FEATURES, out_features), rank=rank)
    with torch.no_grad():
        layer.lora_B.normal_()
    weight, bias = layer.base.weight, layer.base.bias
    s = float(layer.output_scale().detach()[0])
    lora_A, lora_B = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    x = torch.randn(M, IN_FEATURES, requires_grad=True)
    grad_y = torch.randn(M, out_features)
    candidates = {"folded": Folded, "appended": Appended}
    reference = torch.autograd.grad(layer(x), (x, layer.lora_A, layer.lora_B), grad_y)
    for name, function in candidates.items():
        grads = torch.autograd.grad(function.apply(x, weight, bias, lora_A, lora_B, s), (x, lora_A, lora_B), grad_y)
        for got, want in zip(grads, reference):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    steps = {"base": lambda: layer.base(x).backward(grad_y), "metapeft": lambda: layer(x).backward(grad_y)}
    steps.update({name: (lambda f=function: f.apply(x, weight, bias, lora_A, lora_B, s).backward(grad_y))
                  for name, function in candidates.items()})
    times = interleaved_timings(steps, warmup=2, reps=reps)
    row = {"N": out_features, "r": rank}
    row.update({f"{name}_cpu_ms": timing.cpu_s * 1e3 for name, timing in times.items()})
    row.update({f"{name}/base": times[name].cpu_s / times["base"].cpu_s for name in ("metapeft", *candidates)})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--reps", type=int, default=11, help="interleaved rounds per case (default 11)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for out_features in OUT_FEATURES:
        for rank in RANKS:
            rows.append(measure(out_features, rank, args.reps))
            print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    record_results("floor_variants", rows, f"LoRA arrangements fwd+bwd over the frozen base, CPU fp32, M = 8*197, "
                                           f"K = 768, S = 1, {args.threads} thread(s), {args.reps} rounds")
    print("medians over the shapes: " + ", ".join(
        f"{name}/base {statistics.median(r[f'{name}/base'] for r in rows):.3f}"
        for name in ("metapeft", "folded", "appended")))


if __name__ == "__main__":
    main()
