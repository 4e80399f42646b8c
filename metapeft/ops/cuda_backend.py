"""The ``cuda`` backend: the scaled-LoRA op's launchers for ``metapeft._C`` (built from ``csrc/``); no adapter op.

The C++ ops ``metapeft::scaled_lora_fwd_cuda`` / ``metapeft::scaled_lora_bwd_cuda`` take the same
arguments as the torch backend (x (M, K), weight (N, K), bias (N,) or None, lora_A (S*r, K),
lora_B (N, r), scale (S,), dropout_p, seed: an int64 scalar tensor on x's device, read by the kernel) and
compute the same math: cuBLAS GEMMs plus two kernels of ours, the seeded dropout (a hash of seed and element
index, never a stored mask) and the backward's fused rank-space pass (scaled T = c T and d scale = sum(T * h) in
fp32, deterministic). Their fake
kernels are registered here. The library also registers CPU kernels of the same ops (so CPU tests
exercise its checks and host code); the backend itself runs only CUDA tensors.

Masks differ from the torch backend's (torch.Generator) and the Triton backend's (Philox): dropout is
reproducible within a backend, not across backends.
"""

from __future__ import annotations

import importlib.util

import torch

from metapeft.ops.backends import Backend, OpImpl, register_backend, register_op
from metapeft.ops.scaled_lora_op import scaled_lora_bwd, scaled_lora_fwd

if importlib.util.find_spec("metapeft._C") is None:
    EXTENSION_ERROR = ("metapeft._C is not built (installed without a CUDA toolkit or with METAPEFT_BUILD_CUDA=0; "
                       "reinstall with a toolkit: see README, Install)")
else:
    try:
        from metapeft import _C  # noqa: F401  (loading the library registers the ops)

        EXTENSION_ERROR = None
        if "Tensor? seed" not in str(torch.ops.metapeft.scaled_lora_fwd_cuda.default._schema):
            EXTENSION_ERROR = ("metapeft._C was built from older csrc/ sources (its ops take the dropout seed as an "
                               "int, not a device tensor); rebuild it (pip install --no-build-isolation -e .)")
    except ImportError as error:  # e.g. built against another torch: undefined symbols
        EXTENSION_ERROR = f"metapeft._C does not load ({error}); rebuild it against this torch"


def cuda_unavailable_reason() -> str | None:
    """Why the ``cuda`` backend cannot run in this process (``None``: it can)."""
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if not torch.cuda.is_available():
        return "CUDA is not available (no GPU or a CPU-only torch)"
    return None


def scaled_lora_fwd_cuda(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    """Return ``(y (M, N), h (M, S*r))`` from the C++ op; arguments as in ``scaled_lora_fwd_torch``."""
    return torch.ops.metapeft.scaled_lora_fwd_cuda(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


def scaled_lora_bwd_cuda(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, needs):
    """Gradients ``(dx, dweight, dbias, dA, dB, dscale)`` from the C++ op, None where ``needs`` is False."""
    grads = torch.ops.metapeft.scaled_lora_bwd_cuda(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed,
                                                    list(needs))
    return tuple(g if need else None for g, need in zip(grads, needs))


def dropout_factors_cuda(x, dropout_p, seed):
    """The C++ ops' dropout factors for x (M, K): 1/(1-p) where kept, 0 elsewhere (hash of seed and index)."""
    return torch.ops.metapeft.seeded_dropout_cuda(torch.ones_like(x), dropout_p, seed)


if EXTENSION_ERROR is None:

    # Same output contract as the core ops: their fake kernels give the shapes.
    @torch.library.register_fake("metapeft::scaled_lora_fwd_cuda")
    def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
        return scaled_lora_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, "cuda")

    @torch.library.register_fake("metapeft::scaled_lora_bwd_cuda")
    def _(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, needs):
        return scaled_lora_bwd(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, "cuda", needs)

    @torch.library.register_fake("metapeft::seeded_dropout_cuda")
    def _(x, p, seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

# "auto" does not pick this backend yet: its kernels have not run on a GPU in CI; the GPU benchmark
# (cuda vs triton vs reference vs HF PEFT) decides whether it becomes the CUDA default.
register_backend(
    Backend("cuda", device_types=("cuda",), auto_device_types=(), unavailable_reason=cuda_unavailable_reason)
)
if EXTENSION_ERROR is None:
    register_op("cuda", "scaled_lora", OpImpl(scaled_lora_fwd_cuda, scaled_lora_bwd_cuda, dropout_factors_cuda))
