"""metapeft: MetaPEFT (meta-learned hyperparameters for parameter-efficient fine-tuning) for PyTorch."""

from metapeft import meta, ops
from metapeft.layers import FusedMetaLoRA, MetaPEFTModule
from metapeft.meta import HypergradientResult, hypergradient, trainable_phi
from metapeft.params import mark_only_peft_trainable, meta_parameters, peft_parameters

__version__ = "0.1.0"

__all__ = [
    "FusedMetaLoRA",
    "HypergradientResult",
    "MetaPEFTModule",
    "hypergradient",
    "mark_only_peft_trainable",
    "meta",
    "meta_parameters",
    "ops",
    "peft_parameters",
    "trainable_phi",
]
