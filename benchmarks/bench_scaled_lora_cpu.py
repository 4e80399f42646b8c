"""CPU benchmark of one scaled-LoRA layer, fwd+bwd at ViT-B shapes: FusedMetaLoRA vs plain PyTorch and HF PEFT.

Shapes: x (8*197, 768) (batch 8 of ViT-B/16 tokens), fp32, into ``nn.Linear(768, N)`` for N = 768 (attention
out), 3072 (fc1), 2304 (qkv, as one LoRA: S = 1, and with q, k, v each their own LoRA and gamma: S = 3), ranks
1, 8, 16. Contenders, on identical frozen base weights with a nonzero B:
- ``metapeft``: ``FusedMetaLoRA`` (learnable modulator; the ``auto`` backend, ``torch`` on CPU);
- ``plain``: ``benchmarks.contenders.PlainMetaLoRA``, the strongest plain-PyTorch formulation with a learnable
  modulator (scale on B, no concatenation), autograd backward;
- ``hf_peft`` (PEFT-style, fixed scale): PEFT's ``lora.Linear``, one rank-r LoRA over all N outputs even
  where S = 3 (PEFT cannot split a fused qkv: a third of metapeft's LoRA work there);
- ``base``: the frozen ``nn.Linear`` alone, the floor any LoRA layer pays (issue 23: metapeft <= 1.08x of it).
One timed call is ``layer(x).backward(grad_y)`` with x requiring grad. Contenders are interleaved round by round;
medians and interquartile ranges of process CPU time (the steadier measure on a shared machine) and of wall time,
and the bytes autograd saves for backward, go to ``benchmarks/results/scaled_lora_cpu.{json,md}``.

Run: ``python benchmarks/bench_scaled_lora_cpu.py --threads 1`` (``--quick``: one small case, nothing recorded).
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
from benchmarks.contenders import PlainMetaLoRA, hf_peft_lora_linear  # noqa: E402
from benchmarks.harness import interleaved_timings, record_results, saved_tensor_bytes  # noqa: E402

M, IN_FEATURES = 8 * 197, 768
CASES = [(768, 1), (3072, 1), (2304, 1), (2304, 3)]  # (N, S)
RANKS = (1, 8, 16)
CONTENDERS = ("metapeft", "plain", "hf_peft", "base")


def build(contender: str, out_features: int, segments: int, rank: int) -> nn.Module:
    """One contender around a fresh (seeded: identical) ``nn.Linear(768, out_features)``, with a nonzero LoRA B."""
    torch.manual_seed(0)
    base = nn.Linear(IN_FEATURES, out_features)
    if contender == "hf_peft":
        return hf_peft_lora_linear(base, rank)
    if contender == "base":
        return base.requires_grad_(False)
    cls = metapeft.FusedMetaLoRA if contender == "metapeft" else PlainMetaLoRA
    layer = cls(base, rank=rank, segments=segments)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def measure(rows_m: int, out_features: int, segments: int, rank: int, reps: int) -> dict:
    """One row: per-contender CPU and wall medians (ms) and IQRs, ratios, and saved-for-backward MiB."""
    torch.manual_seed(1)
    x = torch.randn(rows_m, IN_FEATURES, requires_grad=True)
    grad_y = torch.randn(rows_m, out_features)
    layers = {name: build(name, out_features, segments, rank) for name in CONTENDERS}
    layers["plain"].load_state_dict(layers["metapeft"].state_dict())
    layers["base"].load_state_dict(layers["metapeft"].base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layers["plain"](x), layers["metapeft"](x), rtol=1e-4, atol=1e-3)
    steps = {name: (lambda layer=layer: layer(x).backward(grad_y)) for name, layer in layers.items()}
    saved = {name: saved_tensor_bytes(lambda layer=layer: layer(x)) for name, layer in layers.items()}
    times = interleaved_timings(steps, warmup=2, reps=reps)
    row = {"N": out_features, "S": segments, "r": rank}
    for name, timing in times.items():
        row[f"{name}_cpu_ms"] = timing.cpu_s * 1e3
        row[f"{name}_cpu_iqr_ms"] = timing.cpu_iqr_s * 1e3
    for name in ("plain", "hf_peft", "base"):
        row[f"metapeft/{name}"] = times["metapeft"].cpu_s / times[name].cpu_s
    row["hf_peft/base"] = times["hf_peft"].cpu_s / times["base"].cpu_s
    for name, timing in times.items():
        row[f"{name}_wall_ms"] = timing.wall_s * 1e3
    row["wall metapeft/plain"] = times["metapeft"].wall_s / times["plain"].wall_s
    for name, nbytes in saved.items():
        row[f"{name}_saved_MiB"] = nbytes / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads (1 gives steadier medians on a shared, oversubscribed machine)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds per case (default 15)")
    parser.add_argument("--quick", action="store_true", help="one small case (M = 64), nothing recorded")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(64, 2304, 3, 8)] if args.quick else [(M, n, s, r) for n, s in CASES for r in RANKS]
    rows = []
    for rows_m, out_features, segments, rank in cases:
        row = measure(rows_m, out_features, segments, rank, 3 if args.quick else args.reps)
        print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    if not args.quick:
        title = (f"Scaled LoRA fwd+bwd on CPU, fp32, M = 8*197, K = 768, {args.threads} thread(s), "
                 f"{args.reps} interleaved rounds")
        record_results('scaled_lora_cpu', rows, title)
        print(f"median over the shapes: metapeft/base {statistics.median(r['metapeft/base'] for r in rows):.3f}, "
              f"hf_peft/base {statistics.median(r['hf_peft/base'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
