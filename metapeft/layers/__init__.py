"""metapeft's PEFT modules."""

from metapeft.layers.adapter import FusedMetaAdapter, ParallelAdapter, SequentialAdapter
from metapeft.layers.base import MetaPEFTModule
from metapeft.layers.lora import FusedMetaLoRA

__all__ = ["FusedMetaAdapter", "FusedMetaLoRA", "MetaPEFTModule", "ParallelAdapter", "SequentialAdapter"]
