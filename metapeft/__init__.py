"""metapeft: MetaPEFT (meta-learned hyperparameters for parameter-efficient fine-tuning) for PyTorch."""

from metapeft import meta, metrics, ops
from metapeft.gamma import GammaTable, gamma_table, plot_gamma
from metapeft.heads import CosineClassifier
from metapeft.inject import InjectionSummary, inject
from metapeft.io import export_peft, load_adapter, save_adapter
from metapeft.layers import FusedMetaAdapter, FusedMetaLoRA, MetaPEFTModule
from metapeft.losses import LogitAdjustedLoss
from metapeft.merging import merge, unmerge
from metapeft.meta import HypergradientResult, hypergradient, trainable_phi
from metapeft.params import mark_only_peft_trainable, meta_parameters, peft_parameters
from metapeft.trainer import Callback, MetaPEFTTrainer, TrainerConfig

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "CosineClassifier",
    "LogitAdjustedLoss",
    "MetaPEFTTrainer",
    "TrainerConfig",
    "metrics",
    "FusedMetaAdapter",
    "FusedMetaLoRA",
    "GammaTable",
    "HypergradientResult",
    "InjectionSummary",
    "MetaPEFTModule",
    "export_peft",
    "gamma_table",
    "hypergradient",
    "inject",
    "load_adapter",
    "mark_only_peft_trainable",
    "merge",
    "meta",
    "meta_parameters",
    "ops",
    "peft_parameters",
    "plot_gamma",
    "save_adapter",
    "trainable_phi",
    "unmerge",
]
