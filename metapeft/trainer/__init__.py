"""The MetaPEFT trainer: inner SGD on the PEFT weights and head, outer Adam on the modulators.

| module | what lives there |
|---|---|
| :mod:`~metapeft.trainer.config` | :class:`TrainerConfig`, every knob and its checks |
| :mod:`~metapeft.trainer.loop` | :class:`MetaPEFTTrainer`: wiring, ``fit`` (epoch loop), ``evaluate``, stopping |
| :mod:`~metapeft.trainer.step` | one training step: the meta step (hypergradient, Adam on rho) and the inner SGD step |
| :mod:`~metapeft.trainer.output_dir` | the run directory's checkpoint, JSONL log and final weights; exact resume |
| :mod:`~metapeft.trainer.callbacks` | :class:`Callback` and the events ``fit`` emits, with their payloads |
| :mod:`~metapeft.trainer.model_setup` | device, bf16 autocast, the classifier head, which parameters train |
| :mod:`~metapeft.trainer.evaluation` | eval-mode passes: confusion counts, class-mean features |
| :mod:`~metapeft.trainer.distributed` | torchrun's process group, sums over ranks |
| :mod:`~metapeft.trainer.fsdp` | the trainer on an FSDP2 (``fully_shard``) model: sharding it, full tensors in, out |
"""

from metapeft.trainer.callbacks import Callback
from metapeft.trainer.config import TrainerConfig
from metapeft.trainer.distributed import setup_distributed
from metapeft.trainer.loop import MetaPEFTTrainer

__all__ = ["Callback", "MetaPEFTTrainer", "TrainerConfig", "setup_distributed"]
