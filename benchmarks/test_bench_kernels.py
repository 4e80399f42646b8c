"""The kernel benchmarks under pytest-benchmark: scaled LoRA and adapter layers, forward and forward+backward, every
backend that can run on this machine beside the plain-PyTorch and HF PEFT contenders, grouped by shape.

    python -m pytest benchmarks/ --benchmark-only                         # time everything, one table per shape
    python -m pytest benchmarks/ --benchmark-only --benchmark-autosave    # ... and save the run (.benchmarks/)
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare     # ... against the last saved run
    METAPEFT_BENCH_QUICK=1 python -m pytest benchmarks/ --benchmark-disable   # tiny shapes, each call once

The default ``python -m pytest`` collects ``tests/`` only (``testpaths``), so none of this runs there. Device: CUDA
when available (bf16, ``torch.cuda.synchronize()`` inside every timed call), else CPU (fp32,
``METAPEFT_BENCH_THREADS`` threads, default 1). pytest-benchmark times one contender's rounds back to back: use it
to follow one contender across commits (``--benchmark-compare``); ratio claims between contenders come from the
interleaved harness (``benchmarks/harness.py``, ``bench_*.py``), which alternates contenders round by round.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import metapeft
from benchmarks.contenders import PlainMetaAdapter, PlainMetaLoRA, hf_peft_lora_linear
from metapeft.ops.backends import available_backends, get_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
QUICK = os.environ.get("METAPEFT_BENCH_QUICK", "") not in ("", "0")
MODES = ("fwd", "fwd+bwd")

# (name, M, K, N, S, r): tiny (where the host's per-call cost shows), ViT-B attention out / fused qkv (S = 3) / fc1.
LORA_SHAPES = {
    "cpu": [("tiny", 16, 16, 16, 1, 4), ("vitb_proj", 1576, 768, 768, 1, 8), ("vitb_qkv", 1576, 768, 2304, 3, 8)],
    "cuda": [("tiny", 16, 16, 16, 1, 4), ("vitb_qkv", 16384, 768, 2304, 3, 16), ("vitb_fc1", 16384, 768, 3072, 1, 16)],
}
# (name, M, D, bottleneck)
ADAPTER_SHAPES = {"cpu": [("tiny", 16, 16, 4), ("vitb", 1576, 768, 64)],
                  "cuda": [("tiny", 16, 16, 4), ("vitb", 16384, 768, 64)]}


def _shapes(table: dict) -> list:
    return [s for s in table[DEVICE.type] if s[0] == "tiny" or not QUICK]


def fused_backends(family: str) -> list[str]:
    """The backends that run ``family`` on this device and dtype (the Triton interpreter on CPU is a test tool, not a
    contender)."""
    reasons = available_backends()
    return [name for name in ("torch", "triton", "cuda")
            if reasons.get(name) is None and not get_backend(name).not_supported_reasons(DEVICE.type, DTYPE, family)
            and not (name == "triton" and DEVICE.type == "cpu")]


def _peft_installed() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


LORA_CONTENDERS = [*(f"metapeft_{b}" for b in fused_backends("scaled_lora")), "plain",
                   *(["hf_peft"] if _peft_installed() else [])]
ADAPTER_CONTENDERS = [*(f"metapeft_{b}" for b in fused_backends("adapter")), "plain"]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    if DEVICE.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(int(os.environ.get("METAPEFT_BENCH_THREADS", "1")))
        yield
        torch.set_num_threads(threads)
    else:
        yield


def timed(fn):
    """``fn`` that waits for the GPU (pytest-benchmark reads a host clock)."""
    if DEVICE.type != "cuda":
        return fn

    def synchronized():
        fn()
        torch.cuda.synchronize()

    return synchronized


def step(layer: nn.Module, x: torch.Tensor, mode: str, grad_y: torch.Tensor, *extra):
    """The timed call: a training forward (autograd recording), or forward and backward."""
    if mode == "fwd":
        return lambda: layer(x, *extra)
    return lambda: layer(x, *extra).backward(grad_y)


def describe(benchmark, group: str, contender: str, layer: nn.Module, **shape) -> None:
    benchmark.group = group
    benchmark.extra_info.update(contender=contender, device=str(DEVICE), dtype=str(DTYPE).removeprefix("torch."),
                                threads=torch.get_num_threads(), quick=QUICK, **shape)


def check_backend(layer: nn.Module, contender: str) -> None:
    """A fused contender's label names the backend that really ran (no silent fallback in the table)."""
    if contender.startswith("metapeft_"):
        assert layer.last_backend == contender.removeprefix("metapeft_"), (layer.last_backend, contender)


@pytest.mark.parametrize("contender", LORA_CONTENDERS)
@pytest.mark.parametrize("shape", _shapes(LORA_SHAPES), ids=lambda s: s[0])
@pytest.mark.parametrize("mode", MODES)
def test_scaled_lora(benchmark, mode, shape, contender):
    name, M, K, N, S, r = shape
    base = nn.Linear(K, N).to(DEVICE, DTYPE).requires_grad_(False)
    if contender == "hf_peft":  # PEFT: one LoRA over all N with a fixed scale (it cannot split a fused qkv)
        layer = hf_peft_lora_linear(base, r).to(DEVICE, DTYPE)
    else:
        if contender == "plain":
            layer = PlainMetaLoRA(base, r, segments=S).to(DEVICE, DTYPE)
        else:
            layer = metapeft.FusedMetaLoRA(base, r, segments=S, backend=contender.removeprefix("metapeft_"))
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=True)  # dx too, as inside a network
    grad_y = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    call = step(layer, x, mode, grad_y)
    call()
    check_backend(layer, contender)
    describe(benchmark, f"scaled_lora {mode} {name}: M={M} K={K} N={N} S={S} r={r}", contender, layer,
             op="scaled_lora", mode=mode, M=M, K=K, N=N, S=S, r=r)
    benchmark(timed(call))


@pytest.mark.parametrize("contender", ADAPTER_CONTENDERS)
@pytest.mark.parametrize("kind", ("parallel", "sequential"))
@pytest.mark.parametrize("shape", _shapes(ADAPTER_SHAPES), ids=lambda s: s[0])
@pytest.mark.parametrize("mode", MODES)
def test_adapter(benchmark, mode, shape, kind, contender):
    name, M, D, b = shape
    if contender == "plain":
        layer = PlainMetaAdapter(D, b, kind=kind)
    else:
        layer = metapeft.FusedMetaAdapter(D, b, kind=kind, backend=contender.removeprefix("metapeft_"))
    layer = layer.to(DEVICE, DTYPE)
    with torch.no_grad():
        layer.up_weight.normal_()
    x = torch.randn(M, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    residual = torch.randn(M, D, device=DEVICE, dtype=DTYPE)  # the wrapped MLP's output (parallel); unused otherwise
    grad_y = torch.randn(M, D, device=DEVICE, dtype=DTYPE)
    call = step(layer, x, mode, grad_y, *((residual,) if kind == "parallel" else ()))
    call()
    check_backend(layer, contender)
    describe(benchmark, f"adapter {kind} {mode} {name}: M={M} D={D} bottleneck={b}", contender, layer,
             op="adapter", kind=kind, mode=mode, M=M, D=D, bottleneck=b)
    benchmark(timed(call))
