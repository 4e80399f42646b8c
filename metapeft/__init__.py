"""metapeft: MetaPEFT (meta-learned hyperparameters for parameter-efficient fine-tuning) for PyTorch.

The root holds what a user needs: the layers, injection and merging, the parameter groups, one meta step, the
trainer, adapter files (and HF PEFT import/export) and the gamma table. Everything else stays in its submodule
(``metapeft.ops``, ``metapeft.meta``, ``metapeft.trainer``, ``metapeft.gamma``, ``metapeft.heads``, ``metapeft.losses``,
``metapeft.metrics``, ``metapeft.data``...; the README's API section lists them).
"""

from metapeft import meta, metrics, ops  # noqa: F401  (submodules, reachable as metapeft.meta etc.)
from metapeft.adapter_files import load_adapter, save_adapter
from metapeft.gamma import gamma_table
from metapeft.hf_peft import export_peft, from_peft
from metapeft.inject import inject
from metapeft.layers import FusedMetaAdapter, FusedMetaLoRA
from metapeft.merging import merge, unmerge
from metapeft.meta import hypergradient
from metapeft.params import mark_only_peft_trainable, meta_parameters, peft_parameters
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig

__version__ = "0.1.0"

__all__ = [
    "FusedMetaAdapter",
    "FusedMetaLoRA",
    "MetaPEFTTrainer",
    "TrainerConfig",
    "export_peft",
    "from_peft",
    "gamma_table",
    "hypergradient",
    "inject",
    "load_adapter",
    "mark_only_peft_trainable",
    "merge",
    "meta_parameters",
    "peft_parameters",
    "save_adapter",
    "unmerge",
]
