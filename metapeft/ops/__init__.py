"""metapeft's custom ops (namespace ``metapeft``) and their backend dispatch."""

from metapeft.ops.backends import available_backends, select_backend
from metapeft.ops.scaled_lora import scaled_lora

__all__ = ["available_backends", "scaled_lora", "select_backend"]
