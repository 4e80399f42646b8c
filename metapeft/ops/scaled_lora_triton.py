"""The ``triton`` backend of the scaled-LoRA op: registers the launchers of ``kernels/scaled_lora.py``.

Runs on CUDA tensors (the default there) and, for tests, on CPU tensors when the process was started
with ``TRITON_INTERPRET=1`` (Triton decides interpreted vs compiled when the kernels are defined, so the
variable must be set before they are imported). Inputs: fp32, fp16 or bf16 (fp32 accumulation); the
math, shapes and dropout rule are in the kernel module's docstring. The kernels are imported on first
use, so ``import metapeft`` does not import Triton.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from metapeft.ops.backends import Backend, register_backend
from metapeft.ops.dropout import register_dropout_factors
from metapeft.ops.scaled_lora import register_scaled_lora_impl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def kernels():
    """The kernel module: ``metapeft.kernels.scaled_lora`` when installed, ``kernels.scaled_lora`` in a checkout."""
    if importlib.util.find_spec("metapeft.kernels") is not None:
        return importlib.import_module("metapeft.kernels.scaled_lora")
    return importlib.import_module("kernels.scaled_lora")


def _unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    return None


def _interpreter_needed_on_cpu(x: torch.Tensor) -> str | None:
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "runs on CPU tensors only under the Triton interpreter (start the process with TRITON_INTERPRET=1)"
    return None


def _dtype_supported(x: torch.Tensor) -> str | None:
    if x.dtype not in SUPPORTED_DTYPES:
        return f"runs fp32/fp16/bf16 inputs, got {x.dtype}"
    return None


def scaled_lora_fwd_triton(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    """Forward launcher; same signature and outputs as ``scaled_lora_fwd_torch``: ``(y (M, N), h (M, S*r))``."""
    return kernels().scaled_lora_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


def scaled_lora_bwd_triton(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, needs):
    """Backward launcher; same signature and outputs as ``scaled_lora_bwd_torch`` (None where ``needs`` is False)."""
    return kernels().scaled_lora_bwd(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, needs)


def scaled_lora_dropout_factors_triton(x, dropout_p, seed):
    """The kernels' dropout factors for x (M, K): 1/(1-p) where kept, 0 elsewhere (fp32, Philox from ``seed``);
    the adapter kernels draw the same mask."""
    return kernels().scaled_lora_dropout_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device)


register_backend(Backend("triton", device_types=("cuda", "cpu"), auto_device_types=("cuda",),
                         unavailable_reason=_unavailable_reason,
                         extra_checks=[_interpreter_needed_on_cpu, _dtype_supported]))
register_scaled_lora_impl("triton", scaled_lora_fwd_triton, scaled_lora_bwd_triton)
register_dropout_factors("triton", scaled_lora_dropout_factors_triton)
