"""CPU benchmark (pytest-benchmark): FusedMetaLoRA fwd+bwd vs the unfused reference and HF PEFT at ViT-B shapes.

Run: ``python -m pytest benchmarks/test_scaled_lora_cpu.py --benchmark-columns=median,iqr,rounds``
(not part of the default test run, whose testpaths is ``tests/``). Records medians and the bytes each
contender saves for backward in ``benchmarks/results/scaled_lora_cpu.{json,md}``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metapeft
from benchmarks.contenders import ReferenceMetaLoRA, hf_peft_lora_linear
from benchmarks.harness import record_results, saved_tensor_bytes

M, IN_FEATURES = 8 * 197, 768
OUT_FEATURES = (768, 2304, 3072)
RANKS = (1, 8, 16)
ROWS: list[dict] = []


def build(contender: str, out_features: int, rank: int) -> nn.Module:
    base = nn.Linear(IN_FEATURES, out_features)
    if contender == "metapeft":
        layer = metapeft.FusedMetaLoRA(base, rank=rank)
        with torch.no_grad():
            layer.lora_B.normal_()
        return layer
    if contender == "reference":
        layer = ReferenceMetaLoRA(base, rank=rank)
        with torch.no_grad():
            layer.lora_B.normal_()
        return layer
    return hf_peft_lora_linear(base, rank)


@pytest.fixture(scope="module", autouse=True)
def _record():
    yield
    if ROWS:
        record_results("scaled_lora_cpu", ROWS, "Scaled LoRA fwd+bwd on CPU, fp32, M = 8*197, K = 768",
                       command="python -m pytest benchmarks/test_scaled_lora_cpu.py")


@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("out_features", OUT_FEATURES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("contender", ["metapeft", "reference", "hf_peft"])
def test_fwd_bwd(benchmark, contender, out_features, rank):
    torch.manual_seed(0)
    layer = build(contender, out_features, rank)
    x = torch.randn(M, IN_FEATURES, requires_grad=True)
    grad_y = torch.randn(M, out_features)

    def step():
        layer(x).backward(grad_y)

    saved = saved_tensor_bytes(lambda: layer(x))
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    benchmark.extra_info["saved_bytes"] = saved
    ROWS.append({"contender": contender, "N": out_features, "r": rank, "median_ms": benchmark.stats.stats.median * 1e3,
                 "iqr_ms": benchmark.stats.stats.iqr * 1e3, "saved_MiB": saved / 2**20})
