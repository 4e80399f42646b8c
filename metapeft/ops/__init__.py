"""metapeft's custom ops (namespace ``metapeft``) and their backend dispatch."""

from metapeft.ops import (
    adapter_triton,  # noqa: F401  (adds the adapter op to the triton backend; imports no triton)
    scaled_lora_cuda,  # noqa: F401  (registers the cuda backend; loads metapeft._C if built)
    scaled_lora_triton,  # noqa: F401  (registers the triton backend; imports no triton)
)
from metapeft.ops.adapter import adapter
from metapeft.ops.backends import available_backends, select_backend
from metapeft.ops.scaled_lora import scaled_lora

__all__ = ["adapter", "available_backends", "scaled_lora", "select_backend"]
