"""GPU benchmark of the scaled-LoRA layer: fused backends vs plain PyTorch, HF PEFT and the frozen base Linear.

One command does everything on one GPU (H200: about 6 minutes, bounded by ``--budget-s``):

    python benchmarks/bench_scaled_lora_gpu.py            # full grid
    python benchmarks/bench_scaled_lora_gpu.py --quick    # two tiny cases (smoke run)

Steps: build every contender (Triton compiles and autotunes on first use), check each one's output and
gradients against the fp32 reference on the same bf16 weights, then time fwd, bwd and fwd+bwd
(``triton.testing.do_bench`` medians via the harness) with peak memory, for M in {256, ..., 65536},
ViT-B (768 -> 2304 qkv with S=3, 768 -> 3072 fc1) and ViT-L (1024 -> 3072 qkv, 1024 -> 4096 fc1), r in
{8, 16, 64}, bf16. Contenders: ``base`` (the frozen nn.Linear alone: the floor), ``plain``
(``benchmarks.contenders.PlainMetaLoRA``: the strongest plain-PyTorch formulation with a learnable modulator),
``hf_peft`` (PEFT-style: PEFT's ``lora.Linear``, fixed scale, one LoRA over all N), and ``FusedMetaLoRA`` with
the ``torch``, ``triton`` and, when ``metapeft._C`` is built, ``cuda`` backends. Correctness is checked against
``metapeft.reference`` in fp32 on the same bf16 weights. Rows go to
``benchmarks/results/scaled_lora_gpu.{json,md}``; the targets (fwd+bwd: >= 1.25x the plain contender's speed
for M >= 4096 and never slower; fwd and fwd+bwd <= 1.10x the base Linear's time) are checked and printed at the
end. Without CUDA, ``--quick`` runs only the correctness step on CPU (the triton contender needs
``TRITON_INTERPRET=1`` there) and records nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metapeft  # noqa: E402
from benchmarks.contenders import PlainMetaLoRA, hf_peft_lora_linear  # noqa: E402
from benchmarks.harness import gpu_bench, record_results  # noqa: E402
from metapeft.reference import scaled_lora_reference  # noqa: E402

# (model, layer, K, N, S)
LAYERS = [
    ("ViT-B", "qkv", 768, 2304, 3),
    ("ViT-B", "fc1", 768, 3072, 1),
    ("ViT-L", "qkv", 1024, 3072, 3),
    ("ViT-L", "fc1", 1024, 4096, 1),
]
TOKENS = (256, 1024, 4096, 16384, 65536)
RANKS = (8, 16, 64)
QUICK_LAYERS = [("tiny", "qkv", 64, 96, 3), ("tiny", "fc1", 64, 128, 1)]
QUICK_TOKENS, QUICK_RANKS = (64,), (8,)
MODES = ("fwd", "bwd", "fwd+bwd")


def fused_backends(device: torch.device) -> list[str]:
    """The FusedMetaLoRA backends that can run on ``device`` here (``cuda`` only when ``metapeft._C`` is built)."""
    return [name for name in ("torch", "triton", "cuda")
            if name in metapeft.ops.available_backends()
            and not metapeft.ops.backends.get_backend(name).not_supported_reasons(device.type, torch.float32)]


def build(contender: str, K: int, N: int, S: int, r: int, device, dtype) -> nn.Module:
    """One contender around a fresh frozen ``nn.Linear(K, N)`` (same seed: same base weights) with a nonzero B."""
    torch.manual_seed(0)
    base = nn.Linear(K, N).to(device, dtype).requires_grad_(False)
    if contender == "base":
        return base
    if contender == "hf_peft":
        layer = hf_peft_lora_linear(base, r)
    elif contender == "plain":
        layer = PlainMetaLoRA(base, r, segments=S)
    else:
        layer = metapeft.FusedMetaLoRA(base, r, segments=S, backend=contender)
    layer = layer.to(device, dtype)
    if contender != "hf_peft":
        with torch.no_grad():
            layer.lora_B.normal_()
    return layer


def lora_tensors(layer: nn.Module, S: int):
    """(lora_A (S*r, K), lora_B (N, r), scale (S,)) of a plain or FusedMetaLoRA contender."""
    if isinstance(layer, PlainMetaLoRA):
        scale = nn.functional.softplus(layer.modulator) * (layer.alpha / layer.rank)
    else:
        scale = layer.scale()
    return layer.lora_A, layer.lora_B, scale.expand(S)


def check(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, S: int) -> float:
    """Largest error of y, dx, dA, dB (relative to each tensor's max) against the fp32 reference on the same weights."""
    lora_A, lora_B, scale = lora_tensors(layer, S)
    params = [lora_A, lora_B]
    x = x.detach().requires_grad_(True)
    y = layer(x)
    got = [y, *torch.autograd.grad(y, [x, *params], grad_y)]
    x32 = x.detach().float().requires_grad_(True)
    a32, b32 = (p.detach().float().requires_grad_(True) for p in params)
    base = layer.base
    y32 = scaled_lora_reference(x32, base.weight.float(), base.bias.float(), a32, b32, scale.detach().float())
    want = [y32, *torch.autograd.grad(y32, [x32, a32, b32], grad_y.float())]
    return max(((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-6)).item() for g, w in zip(got, want))


def steps(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> dict:
    """The three timed closures: forward (recording autograd), backward of a kept graph, and both."""
    y = layer(x)
    return {
        "fwd": lambda: layer(x),
        "bwd": lambda: y.backward(grad_y, retain_graph=True),
        "fwd+bwd": lambda: layer(x).backward(grad_y),
    }


def run_case(contenders: list[str], K: int, N: int, S: int, r: int, M: int, device, dtype, timed: bool
             ) -> tuple[list[dict], dict[str, float]]:
    """Correctness check then timing of every contender for one shape: (one row per mode, name -> max error)."""
    torch.manual_seed(1)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(M, N, device=device, dtype=dtype)
    rows = {mode: {} for mode in MODES}
    errors = {}
    for name in contenders:
        layer = build(name, K, N, S, r, device, dtype)
        if name not in ("base", "hf_peft"):
            errors[name] = check(layer, x, grad_y, S)
        if not timed:
            continue
        for mode, fn in steps(layer, x, grad_y).items():
            median_ms, peak = gpu_bench(fn, warmup_ms=10, rep_ms=50)
            rows[mode][f"{name}_ms"] = median_ms
            rows[mode][f"{name}_peak_MiB"] = peak / 2**20
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = []
    for mode, timing in rows.items():
        row = {"K": K, "N": N, "S": S, "r": r, "M": M, "mode": mode, **timing}
        for name in contenders:
            if f"{name}_ms" in timing and name not in ("base", "plain"):
                row[f"plain/{name}"] = timing["plain_ms"] / timing[f"{name}_ms"]
                row[f"{name}/base"] = timing[f"{name}_ms"] / timing["base_ms"]
        row["max_rel_err"] = max(errors.values())
        out.append(row)
    return out, errors


def check_targets(rows: list[dict], contender: str) -> list[str]:
    """The issue's targets for ``contender``; returns the misses (empty: all met).

    fwd+bwd: >= 1.25x the plain contender's speed for M >= 4096 and never slower at any M; fwd and fwd+bwd:
    at most 1.10x the frozen base Linear's time.
    """
    failures = []
    for row in (r for r in rows if f"plain/{contender}" in r):
        where = f"{row['model']} {row['layer']} M={row['M']} r={row['r']} {row['mode']}"
        speedup, over_base = row[f"plain/{contender}"], row[f"{contender}/base"]
        if row["mode"] == "fwd+bwd" and row["M"] >= 4096 and speedup < 1.25:
            failures.append(f"{where}: {speedup:.2f}x the plain contender's speed (target >= 1.25x)")
        if row["mode"] == "fwd+bwd" and speedup < 1.0:
            failures.append(f"{where}: slower than the plain contender ({speedup:.2f}x its speed)")
        if row["mode"] in ("fwd", "fwd+bwd") and over_base > 1.10:
            failures.append(f"{where}: {over_base:.2f}x the frozen base Linear's time (target <= 1.10x)")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two tiny cases: a smoke run")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cases after this long")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.quick:
        sys.exit("bench_scaled_lora_gpu.py needs a CUDA device (without one, --quick runs the correctness step only)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers, tokens, ranks = (QUICK_LAYERS, QUICK_TOKENS, QUICK_RANKS) if args.quick else (LAYERS, TOKENS, RANKS)
    has_peft = importlib.util.find_spec("peft") is not None
    contenders = ["base", "plain", *(["hf_peft"] if has_peft else []), *fused_backends(device)]
    if not has_peft:
        print("peft is not installed: no hf_peft contender in this run", flush=True)
    print(f"device {device}, dtype {dtype}, contenders {contenders}", flush=True)
    start, rows, skipped = time.perf_counter(), [], 0
    for model, layer_name, K, N, S in layers:
        for r in ranks:
            for M in tokens:
                if time.perf_counter() - start > args.budget_s:
                    skipped += 1
                    continue
                case_rows, errors = run_case(contenders, K, N, S, r, M, device, dtype, timed=device.type == "cuda")
                tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
                bad = {name: err for name, err in errors.items() if not err <= tolerance}
                if bad:
                    sys.exit(f"{model} {layer_name} M={M} r={r}: wrong results (max relative error) {bad}")
                rows += [{"model": model, "layer": layer_name, **row} for row in case_rows]
                line = next(row for row in case_rows if row["mode"] == "fwd+bwd")
                print(f"{model} {layer_name} r={r} M={M}: " + ", ".join(
                    f"{k}={v:.3g}" for k, v in line.items() if k.endswith("_ms") or "/" in k or "err" in k), flush=True)
    elapsed = time.perf_counter() - start
    print(f"{len(rows) // len(MODES)} cases in {elapsed:.0f} s; {skipped} skipped by --budget-s", flush=True)
    if device.type != "cuda":
        print("correctness step passed on CPU; nothing timed or recorded")
        return
    name = "scaled_lora_gpu_quick" if args.quick else "scaled_lora_gpu"
    title = (f"Scaled LoRA layer on GPU, bf16: fwd / bwd / fwd+bwd medians (ms) and peak memory; "
             f"{skipped} cases skipped by the time budget")
    record_results(name, rows, title)
    for contender in [c for c in ("triton", "cuda") if c in contenders]:
        failures = check_targets(rows, contender)
        print(f"targets for {contender}: " + ("all met" if not failures else f"{len(failures)} missed"))
        for failure in failures:
            print("  " + failure)


if __name__ == "__main__":
    main()
