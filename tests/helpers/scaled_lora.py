"""Inputs and forward/backward drivers for the scaled-LoRA op tests, and the Triton-backend oracle check."""

import torch
import torch.nn.functional as F

from metapeft.ops import scaled_lora
from metapeft.reference import scaled_lora_reference
from tests.helpers.oracle import assert_2x_rule, non_contiguous

# (M, K, N, r, S): M = 1 and odd sizes, K and N not multiples of 16, ranks 1..64, S in {1, 3}.
SHAPES = [
    (1, 40, 48, 1, 1),
    (7, 40, 201, 4, 3),
    (97, 200, 120, 8, 3),
    (1000, 72, 200, 16, 1),
    (33, 96, 192, 64, 3),
]


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


GRANULARITIES = ("segment", "channel")


def make_inputs(M, K, N, r, S, dtype, bias=True, device="cpu", granularity="segment"):
    """Random op inputs in float64 (the oracle's) and their ``dtype`` copies; the scale (S,) per segment or (N,) per
    output channel (``granularity``)."""
    g = torch.Generator().manual_seed(M * 7 + K * 3 + N + r + S)
    inputs64 = {
        "x": torch.randn(M, K, generator=g, dtype=torch.float64),
        "weight": torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5,
        "bias": torch.randn(N, generator=g, dtype=torch.float64) if bias else None,
        "lora_A": torch.randn(S * r, K, generator=g, dtype=torch.float64) / K**0.5,
        "lora_B": torch.randn(N, r, generator=g, dtype=torch.float64) / r**0.5,
        "scale": torch.rand(S if granularity == "segment" else N, generator=g, dtype=torch.float64) + 0.5,
    }
    inputs64 = {k: None if v is None else v.to(device) for k, v in inputs64.items()}
    cast = {k: None if v is None else v.to(torch.float32 if k == "scale" else dtype) for k, v in inputs64.items()}
    return inputs64, cast


def forward_backward(fn, inputs, grad_y, x_transform=lambda t: t):
    """y and the gradients of <y, grad_y> with respect to every tensor input."""
    leaves = {k: None if v is None else v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = fn(x_transform(leaves["x"]), leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
           leaves["scale"])
    y.backward(grad_y)
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return y.detach(), grads


def kernels():
    """The scaled-LoRA kernel module, imported only inside the interpreter child."""
    from metapeft.ops.triton_backend import kernel_module

    return kernel_module("scaled_lora")


def dropout_mask(M: int, K: int, p: float, seed: int, device="cpu") -> torch.Tensor:
    """The dropout factors (M, K) fp32 every triton kernel applies to x for ``seed``."""
    from metapeft.ops.triton_backend import kernel_module

    return kernel_module("common").dropout_mask(M, K, p, seed, torch.device(device))


def poison_allocator(numel: int, dtype: torch.dtype, device: str = "cpu") -> None:
    """Fill and free NaN memory so that outputs the kernels fail to write show up as NaN."""
    for _ in range(4):
        torch.full((numel,), float("nan"), dtype=dtype, device=device)


def triton_op(dropout_p=0.0, seed=0):
    def run(x, weight, bias, lora_A, lora_B, scale):
        return scaled_lora(x, weight, bias, lora_A, lora_B, scale, dropout_p=dropout_p, seed=seed, backend="triton")

    return run


def dropout_oracle(factors: torch.Tensor):
    """Scaled LoRA whose LoRA branch sees ``x * factors`` (the kernel's dropout mask), in factors' dtype."""

    def run(x, weight, bias, lora_A, lora_B, scale):
        lora = scaled_lora_reference(x * factors, torch.zeros_like(weight), None, lora_A, lora_B, scale)
        return F.linear(x, weight, bias) + lora

    return run


def check_against_oracle(shape, dtype, bias=True, dropout_p=0.0, seed=0, device="cpu", op=triton_op,
                         mask=dropout_mask, granularity="segment"):
    """Forward and every gradient of ``op(dropout_p, seed)`` vs float64 by the 2x rule (non-contiguous x and dY,
    poisoned memory); ``mask(M, K, p, seed, device)`` gives the dropout factors that backend applies to x.

    The oracle runs on the ``dtype``-rounded inputs, so only the computation's own error is compared. d scale is a
    sum over h, which is saved in x's dtype: its error floor is that dtype's, not scale's fp32.
    """
    M, K, N, _, _ = shape
    _, inputs = make_inputs(*shape, dtype=dtype, bias=bias, device=device, granularity=granularity)
    inputs64 = {k: None if v is None else v.double() for k, v in inputs.items()}
    grad64 = torch.randn(M, N, dtype=torch.float64, device=device)
    if dropout_p > 0.0:
        factors = mask(M, K, dropout_p, seed, device).double()
        oracle, baseline = dropout_oracle(factors), dropout_oracle(factors.to(dtype))
    else:
        oracle = baseline = scaled_lora_reference
    poison_allocator(M * max(N, K) * 2, dtype, device)
    y_fast, g_fast = forward_backward(op(dropout_p, seed), inputs, non_contiguous(grad64.to(dtype)),
                                      x_transform=non_contiguous)
    y_base, g_base = forward_backward(baseline, inputs, grad64.to(dtype))
    y_ref, g_ref = forward_backward(oracle, inputs64, grad64)
    assert y_fast.dtype == dtype
    assert_2x_rule("y", y_fast, y_base, y_ref)
    assert set(g_fast) == set(g_ref)
    for name in g_ref:
        assert g_fast[name].dtype == inputs[name].dtype, name
        assert_2x_rule(f"d{name}", g_fast[name], g_base[name], g_ref[name], floor_dtype=dtype)
