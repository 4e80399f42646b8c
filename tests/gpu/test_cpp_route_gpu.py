"""The C++ route (csrc/autograd.cpp: one dispatcher call, a hand-written autograd node) on CUDA tensors: outputs and
every gradient within the 2x rule against the float64 oracle, at S = 1 and 3, both gamma granularities, small shapes
(the block-diagonal B) and large ones (the per-segment products), and for the adapter; then the backward's gradients
at bf16 against the same layer on the Python route."""

import pytest
import torch

import metapeft
from metapeft.ops.cpp_autograd import python_routes
from metapeft.ops.scaled_lora_op import SCALED_LORA
from tests.helpers.adapter import make_inputs as adapter_inputs
from tests.helpers.cpp_route import check_adapter_by_2x_rule, check_scaled_lora_by_2x_rule
from tests.helpers.scaled_lora import GRANULARITIES
from tests.helpers.scaled_lora import make_inputs as lora_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SCALED_LORA.cpp_op is None, reason="metapeft._C is not built here")]

# (M, K, N, r, S): M = 1; the block-diagonal B (M N r < 2**22); the per-segment products (ViT-B qkv, batch ~20)
SHAPES = [(1, 40, 48, 1, 1), (97, 200, 768, 8, 3), (4096, 768, 2304, 16, 3), (3152, 768, 3072, 8, 1)]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}_S{}".format(*s))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cpp_route_scaled_lora_on_cuda_by_2x_rule(shape, dtype_name, granularity):
    inputs64, inputs = lora_inputs(*shape, dtype=DTYPES[dtype_name], device="cuda", granularity=granularity)
    check_scaled_lora_by_2x_rule(inputs64, inputs, torch.randn(shape[0], shape[2], dtype=torch.float64, device="cuda"))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("residual", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_cpp_route_adapter_on_cuda_by_2x_rule(dtype_name, residual, channel):
    inputs64, inputs = adapter_inputs(3152, 768, 64, DTYPES[dtype_name], residual=residual, device="cuda",
                                      channel=channel)
    check_adapter_by_2x_rule(inputs64, inputs, torch.randn(3152, 768, dtype=torch.float64, device="cuda"))


def test_cpp_route_layer_on_cuda_matches_python_route_second_order_float64():
    torch.manual_seed(0)
    layer = metapeft.FusedMetaLoRA(torch.nn.Linear(64, 96), rank=4, segments=3).to("cuda", torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 64, dtype=torch.float64, device="cuda", requires_grad=True)

    def first_and_second():
        y = layer(x)
        first = torch.autograd.grad(y.sin().sum(), [x, *layer.peft_parameters()], create_graph=True)
        return (y, *first, *torch.autograd.grad(sum((g * g).sum() for g in first), [layer.modulator, x]))

    got = first_and_second()
    assert "metapeft" in layer(x).grad_fn.name()
    with python_routes():
        want = first_and_second()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
