"""The ``triton`` backend: the launchers of ``metapeft/kernels/`` (one module per op family), registered for both
families.

Runs on CUDA tensors (the default there) and, for tests, on CPU tensors when the process was started
with ``TRITON_INTERPRET=1`` (Triton decides interpreted vs compiled when the kernels are defined, so the
variable must be set before they are imported). Inputs: fp32, fp16 or bf16 (fp32 accumulation); the
math, shapes and the dropout rule are in the kernel modules' docstrings; both families draw one mask
(``metapeft/kernels/common.py``). The kernels are imported on first use, so ``import metapeft`` does not import Triton.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from metapeft.ops.backends import Backend, OpImpl, register_backend, register_op

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def kernel_module(name: str):
    """The kernel module ``name`` ("common", "scaled_lora", "adapter"): ``metapeft.kernels.<name>``."""
    return importlib.import_module(f"metapeft.kernels.{name}")


def _unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    return None


def _interpreter_needed_on_cpu(device_type: str, dtype: torch.dtype) -> str | None:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "runs on CPU tensors only under the Triton interpreter (start the process with TRITON_INTERPRET=1)"
    return None


def _dtype_supported(device_type: str, dtype: torch.dtype) -> str | None:
    if dtype not in SUPPORTED_DTYPES:
        return f"runs fp32/fp16/bf16 inputs, got {dtype}"
    return None


def dropout_factors_triton(x, dropout_p, seed):
    """The kernels' dropout factors for x (M, K): 1/(1-p) where kept, 0 elsewhere (fp32, Philox from ``seed``)."""
    return kernel_module("common").dropout_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device)


def scaled_lora_fwd_triton(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    """Forward launcher; same signature and outputs as ``scaled_lora_fwd_torch``: ``(y (M, N), h (M, S*r))``."""
    return kernel_module("scaled_lora").scaled_lora_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


def scaled_lora_bwd_triton(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed, needs):
    """Backward launcher; same signature and outputs as ``scaled_lora_bwd_torch`` (None where ``needs`` is False)."""
    return kernel_module("scaled_lora").scaled_lora_bwd(grad_y, x, weight, lora_A, lora_B, scale, h, dropout_p, seed,
                                                        needs)


def adapter_fwd_triton(x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p, seed):
    """Forward launcher; same signature and outputs as ``adapter_fwd_torch``: ``(out (M, D), z (M, b))``."""
    return kernel_module("adapter").adapter_fwd(x, residual, down_weight, down_bias, up_weight, up_bias, scale,
                                                activation, dropout_p, seed)


def adapter_bwd_triton(grad_out, x, down_weight, up_weight, up_bias, scale, z, activation, dropout_p, seed,
                       residual_is_x, needs):
    """Backward launcher; same signature and outputs as ``adapter_bwd_torch`` (None where ``needs`` is False)."""
    return kernel_module("adapter").adapter_bwd(grad_out, x, down_weight, up_weight, up_bias, scale, z, activation,
                                                dropout_p, seed, residual_is_x, needs)


register_backend(Backend("triton", device_types=("cuda", "cpu"), auto_device_types=("cuda",),
                         unavailable_reason=_unavailable_reason,
                         input_checks=[_interpreter_needed_on_cpu, _dtype_supported]))
register_op("triton", "scaled_lora", OpImpl(scaled_lora_fwd_triton, scaled_lora_bwd_triton, dropout_factors_triton))
register_op("triton", "adapter", OpImpl(adapter_fwd_triton, adapter_bwd_triton, dropout_factors_triton))
