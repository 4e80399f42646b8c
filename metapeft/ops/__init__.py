"""metapeft's custom ops (namespace ``metapeft``), their backends and the one dispatch point per op family."""

from metapeft.ops import cpp_autograd, cuda_backend, triton_backend  # noqa: F401  (register the backends, the C++ route)
from metapeft.ops.adapter_op import adapter
from metapeft.ops.backends import available_backends, double_backward_ahead, refresh_backends, select_backend
from metapeft.ops.scaled_lora_op import scaled_lora

__all__ = ["adapter", "available_backends", "double_backward_ahead", "refresh_backends", "scaled_lora",
           "select_backend"]
