"""Inputs and forward/backward drivers for the adapter op tests."""

import torch

NAMES = ("x", "residual", "down_weight", "down_bias", "up_weight", "up_bias", "scale")


def make_inputs(M, D, b, dtype, residual=True, bias=True, device="cpu", channel=False):
    """Random op inputs (a dict in the op's argument order) in ``dtype`` (scale: f32, (1,) or with ``channel`` (D,))
    and their exact float64 copies.

    The oracle sees the same (rounded) values as the computation under test, so errors measure computation only.
    """
    g = torch.Generator().manual_seed(M * 7 + D * 3 + b)
    inputs64 = {
        "x": torch.randn(M, D, generator=g, dtype=torch.float64),
        "residual": torch.randn(M, D, generator=g, dtype=torch.float64) if residual else None,
        "down_weight": torch.randn(b, D, generator=g, dtype=torch.float64) / D**0.5,
        "down_bias": torch.randn(b, generator=g, dtype=torch.float64) * 0.5 if bias else None,
        "up_weight": torch.randn(D, b, generator=g, dtype=torch.float64) / b**0.5,
        "up_bias": torch.randn(D, generator=g, dtype=torch.float64) if bias else None,
        "scale": torch.rand(D if channel else 1, generator=g, dtype=torch.float64) + 0.5,
    }
    cast = {k: None if v is None else v.to(device, torch.float32 if k == "scale" else dtype)
            for k, v in inputs64.items()}
    return {k: None if v is None else v.double() for k, v in cast.items()}, cast


def forward_backward(fn, inputs, grad_out, x_transform=lambda t: t, **kwargs):
    """out and the gradients of <out, grad_out> with respect to every tensor input."""
    leaves = {k: None if v is None else v.clone().requires_grad_(True) for k, v in inputs.items()}
    args = [leaves[k] for k in NAMES]
    args[0] = x_transform(args[0])
    out = fn(*args, **kwargs)
    out.backward(grad_out)
    return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None}
