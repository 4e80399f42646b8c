"""The C++ route (csrc/autograd.cpp: one dispatcher call, a hand-written autograd node) on CUDA tensors: outputs and
every gradient within the 2x rule against the float64 oracle, at S = 1 and 3, both gamma granularities, small shapes
(the block-diagonal B) and large ones (the per-segment products), and for the adapter; then the backward's gradients
at bf16 against the same layer on the Python route."""

import pytest
import torch

import metapeft
from metapeft.ops.cpp_autograd import python_routes
from metapeft.ops.scaled_lora_op import SCALED_LORA
from metapeft.reference import adapter_reference, scaled_lora_reference
from tests.helpers.adapter import forward_backward as adapter_forward_backward
from tests.helpers.adapter import make_inputs as adapter_inputs
from tests.helpers.oracle import assert_2x_rule
from tests.helpers.scaled_lora import GRANULARITIES
from tests.helpers.scaled_lora import forward_backward as lora_forward_backward
from tests.helpers.scaled_lora import make_inputs as lora_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SCALED_LORA.cpp_op is None, reason="metapeft._C is not built here")]

# (M, K, N, r, S): M = 1; the block-diagonal B (M N r < 2**22); the per-segment products (ViT-B qkv, batch ~20)
SHAPES = [(1, 40, 48, 1, 1), (97, 200, 768, 8, 3), (4096, 768, 2304, 16, 3), (3152, 768, 3072, 8, 1)]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _on_cpp_route(out):
    assert "metapeft" in out.grad_fn.name(), out.grad_fn.name()
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}_S{}".format(*s))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cpp_route_scaled_lora_on_cuda_by_2x_rule(shape, dtype_name, granularity):
    dtype = DTYPES[dtype_name]
    inputs64, inputs = lora_inputs(*shape, dtype=dtype, device="cuda", granularity=granularity)
    grad64 = torch.randn(shape[0], shape[2], dtype=torch.float64, device="cuda")

    def fused(*args):
        return _on_cpp_route(metapeft.ops.scaled_lora(*args, backend="torch"))

    y_fast, g_fast = lora_forward_backward(fused, inputs, grad64.to(dtype))
    y_base, g_base = lora_forward_backward(scaled_lora_reference, inputs, grad64.to(dtype))
    y_ref, g_ref = lora_forward_backward(scaled_lora_reference, inputs64, grad64)
    assert_2x_rule("y", y_fast, y_base, y_ref)
    for name in g_ref:
        assert_2x_rule(f"d{name}", g_fast[name], g_base[name], g_ref[name])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("residual", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_cpp_route_adapter_on_cuda_by_2x_rule(dtype_name, residual, channel):
    dtype = DTYPES[dtype_name]
    inputs64, inputs = adapter_inputs(3152, 768, 64, dtype, residual=residual, device="cuda", channel=channel)
    grad64 = torch.randn(3152, 768, dtype=torch.float64, device="cuda")

    def fused(*args, **kwargs):
        return _on_cpp_route(metapeft.ops.adapter(*args, **kwargs, backend="torch"))

    fast = adapter_forward_backward(fused, inputs, grad64.to(dtype), activation="gelu")
    base = adapter_forward_backward(adapter_reference, inputs, grad64.to(dtype), activation="gelu")
    ref = adapter_forward_backward(adapter_reference, inputs64, grad64, activation="gelu")
    assert_2x_rule("out", fast[0], base[0], ref[0])
    for name in ref[1]:
        assert_2x_rule(f"d{name}", fast[1][name], base[1][name], ref[1][name])


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
