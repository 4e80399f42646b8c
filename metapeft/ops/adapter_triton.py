"""The ``triton`` backend of the adapter op: registers the launchers of ``kernels/adapter.py``.

The backend object (availability, CPU only under ``TRITON_INTERPRET=1``, fp32/fp16/bf16) is the one that
``metapeft/ops/scaled_lora_triton.py`` registers; this module adds the adapter op's implementation to it.
The kernels are imported on first use, so ``import metapeft`` does not import Triton.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

from metapeft.ops import scaled_lora_triton  # noqa: F401  (registers the triton backend this impl runs under)
from metapeft.ops.adapter import register_adapter_impl


@functools.cache
def kernels():
    """The kernel module: ``metapeft.kernels.adapter`` when installed, ``kernels.adapter`` in a checkout."""
    if importlib.util.find_spec("metapeft.kernels") is not None:
        return importlib.import_module("metapeft.kernels.adapter")
    return importlib.import_module("kernels.adapter")


def adapter_fwd_triton(x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation, dropout_p, seed):
    """Forward launcher; same signature and outputs as ``adapter_fwd_torch``: ``(out (M, D), z (M, b))``."""
    return kernels().adapter_fwd(x, residual, down_weight, down_bias, up_weight, up_bias, scale, activation,
                                 dropout_p, seed)


def adapter_bwd_triton(grad_out, x, down_weight, up_weight, up_bias, scale, z, activation, dropout_p, seed,
                       residual_is_x, needs):
    """Backward launcher; same signature and outputs as ``adapter_bwd_torch`` (None where ``needs`` is False)."""
    return kernels().adapter_bwd(grad_out, x, down_weight, up_weight, up_bias, scale, z, activation, dropout_p, seed,
                                 residual_is_x, needs)


register_adapter_impl("triton", adapter_fwd_triton, adapter_bwd_triton)
