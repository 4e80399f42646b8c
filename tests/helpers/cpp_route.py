"""Checks of the C++ route (csrc/autograd.cpp) shared by the CPU and GPU tests: the call took the route's node, and
its output and every gradient are within the 2x rule against the float64 oracle."""

import torch

import metapeft
from metapeft.reference import adapter_reference, scaled_lora_reference
from tests.helpers.adapter import forward_backward as adapter_forward_backward
from tests.helpers.oracle import assert_2x_rule
from tests.helpers.scaled_lora import forward_backward as lora_forward_backward


def assert_cpp_node(out: torch.Tensor) -> torch.Tensor:
    """``out`` came from the C++ route's autograd node (not a Python Function or the ATen composite)."""
    assert "metapeft" in out.grad_fn.name(), out.grad_fn.name()
    return out


def check_scaled_lora_by_2x_rule(inputs64: dict, inputs: dict, grad64: torch.Tensor, transform=lambda t: t) -> None:
    """``metapeft.ops.scaled_lora`` on the torch backend (the C++ route) against the reference in the inputs' dtype
    and in float64; ``transform`` is applied to x and to the output gradient (e.g. to make them non-contiguous)."""
    grad = transform(grad64.to(inputs["x"].dtype))

    def fused(*args):
        return assert_cpp_node(metapeft.ops.scaled_lora(*args, backend="torch"))

    y_fast, g_fast = lora_forward_backward(fused, inputs, grad, transform)
    y_base, g_base = lora_forward_backward(scaled_lora_reference, inputs, grad64.to(inputs["x"].dtype))
    y_ref, g_ref = lora_forward_backward(scaled_lora_reference, inputs64, grad64)
    assert_2x_rule("y", y_fast, y_base, y_ref)
    for name in g_ref:
        assert_2x_rule(f"d{name}", g_fast[name], g_base[name], g_ref[name])


def check_adapter_by_2x_rule(inputs64: dict, inputs: dict, grad64: torch.Tensor, activation: str = "gelu") -> None:
    """``metapeft.ops.adapter`` on the torch backend (the C++ route) against the reference, as above."""
    grad = grad64.to(inputs["x"].dtype)

    def fused(*args, **kwargs):
        return assert_cpp_node(metapeft.ops.adapter(*args, **kwargs, backend="torch"))

    fast = adapter_forward_backward(fused, inputs, grad, activation=activation)
    base = adapter_forward_backward(adapter_reference, inputs, grad, activation=activation)
    ref = adapter_forward_backward(adapter_reference, inputs64, grad64, activation=activation)
    assert_2x_rule("out", fast[0], base[0], ref[0])
    for name in ref[1]:
        assert_2x_rule(f"d{name}", fast[1][name], base[1][name], ref[1][name])
