"""CPU benchmark (pytest-benchmark): FusedMetaLoRA fwd+bwd vs the unfused reference and HF PEFT at ViT-B shapes.

Run: ``python -m pytest benchmarks/test_scaled_lora_cpu.py --benchmark-columns=median,iqr,rounds``
(not part of the default test run, whose testpaths is ``tests/``). pytest-benchmark times the metapeft
layer; the three contenders are also timed interleaved, round by round, so their ratios are measured
side by side on this shared, noisy machine. Medians, ratios and the bytes each contender saves for
backward go to ``benchmarks/results/scaled_lora_cpu.{json,md}``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metapeft
from benchmarks.contenders import hf_peft_lora_linear
from benchmarks.harness import interleaved_median_times, record_results, saved_tensor_bytes
from metapeft.reference import ReferenceMetaLoRA

M, IN_FEATURES = 8 * 197, 768
OUT_FEATURES = (768, 2304, 3072)
RANKS = (1, 8, 16)
ROWS: list[dict] = []


def build(contender: str, out_features: int, rank: int) -> nn.Module:
    """One contender layer around a fresh ``nn.Linear(768, out_features)`` with a nonzero LoRA B."""
    base = nn.Linear(IN_FEATURES, out_features)
    if contender == "hf_peft":
        return hf_peft_lora_linear(base, rank)
    layer = metapeft.FusedMetaLoRA(base, rank=rank) if contender == "metapeft" else ReferenceMetaLoRA(base, rank=rank)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.fixture(scope="module", autouse=True)
def _record():
    yield
    if ROWS:
        record_results("scaled_lora_cpu", ROWS, "Scaled LoRA fwd+bwd on CPU, fp32, M = 8*197, K = 768, S = 1",
                       command="python -m pytest benchmarks/test_scaled_lora_cpu.py")


@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("out_features", OUT_FEATURES, ids=lambda n: f"N{n}")
def test_fwd_bwd(benchmark, out_features, rank):
    torch.manual_seed(0)
    x = torch.randn(M, IN_FEATURES, requires_grad=True)
    grad_y = torch.randn(M, out_features)
    layers = {name: build(name, out_features, rank) for name in ("metapeft", "reference", "hf_peft")}
    steps = {name: (lambda layer=layer: layer(x).backward(grad_y)) for name, layer in layers.items()}
    saved = {name: saved_tensor_bytes(lambda layer=layer: layer(x)) for name, layer in layers.items()}
    times = interleaved_median_times(steps, warmup=2, reps=15)
    benchmark.pedantic(steps["metapeft"], rounds=5, warmup_rounds=1)
    row = {"N": out_features, "r": rank}
    for name, (median, iqr) in times.items():
        row[f"{name}_ms"] = median * 1e3
        row[f"{name}_iqr_ms"] = iqr * 1e3
    row["metapeft/reference"] = times["metapeft"][0] / times["reference"][0]
    row["metapeft/hf_peft"] = times["metapeft"][0] / times["hf_peft"][0]
    for name, nbytes in saved.items():
        row[f"{name}_saved_MiB"] = nbytes / 2**20
    benchmark.extra_info.update(row)
    ROWS.append(row)
