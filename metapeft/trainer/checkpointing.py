"""What a trainer writes to its ``output_dir`` and reads back: the checkpoint, the JSONL log and the final weights.

- ``checkpoint.pt``: :meth:`MetaPEFTTrainer.state_dict` (an exact resume), written after each epoch, every
  ``save_every_steps`` steps, at ``max_steps`` and on a stop request;
- ``metrics.jsonl``: one strict-JSON record per line, every ``log_every`` steps, each epoch and evaluation;
- ``model.safetensors``: the trained tensors (:func:`trained_tensors`), when ``fit`` finishes.

Only rank 0 writes; files are replaced atomically (:mod:`metapeft.checkpoint`). A checkpoint records how many bytes
of the log existed when it was written, so a resume cuts the log back to that point and the resumed run's log equals
an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from metapeft.checkpoint import save_checkpoint, save_safetensors
from metapeft.trainer.config import RUN_CONTROL_FIELDS

CHECKPOINT_NAME, LOG_NAME, WEIGHTS_NAME = "checkpoint.pt", "metrics.jsonl", "model.safetensors"


def json_safe(value):
    """NaN/inf floats -> None, recursively, so every log line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def trained_tensor_names(model: nn.Module, full: bool) -> list[str]:
    """State-dict names a run saves: trainable parameters and modulators, or every tensor with ``full``."""
    names = list(model.state_dict())
    if full:
        return names
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return [name for name in names if name in trainable or name.rsplit(".", 1)[-1] == "modulator"]


def trained_tensors(model: nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """Detached copies of the tensors named by :func:`trained_tensor_names`."""
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in trained_tensor_names(model, full)}


def load_trained_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's parameters and buffers of the same names; a name the model lacks is a
    ``ValueError`` raised before anything changes."""
    current = model.state_dict()
    missing = sorted(set(tensors) - set(current))
    if missing:
        raise ValueError(f"checkpoint has tensors the model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            current[name].copy_(tensor)


def check_same_config(saved: dict, current: dict) -> None:
    """Refuse to resume when a config field outside ``RUN_CONTROL_FIELDS`` differs from the checkpoint's."""
    changed = [k for k in current if k not in RUN_CONTROL_FIELDS and saved.get(k) != current[k]]
    if changed:
        raise ValueError(f"the checkpoint was written with a different config: {changed} differ "
                         f"({[saved.get(k) for k in changed]} in the checkpoint)")


class RunFiles:
    """The files of one run directory (module docstring); writing is a no-op without a directory or off rank 0."""

    def __init__(self, directory: str | os.PathLike | None, rank: int) -> None:
        self.directory = None if directory is None else Path(directory)
        self.rank0 = rank == 0
        self.writes = self.directory is not None and self.rank0

    @property
    def checkpoint(self) -> Path | None:
        """``output_dir/checkpoint.pt`` (None without a directory)."""
        return None if self.directory is None else self.directory / CHECKPOINT_NAME

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint exists to resume from."""
        return self.checkpoint is not None and self.checkpoint.exists()

    def save_checkpoint(self, state: dict, path: str | os.PathLike | None = None) -> Path | None:
        """Atomically write ``state`` to ``path`` (default :attr:`checkpoint`); returns the path written (None off
        rank 0 or with neither a path nor a directory)."""
        path = path or self.checkpoint
        if path is None or not self.rank0:
            return None
        return save_checkpoint(state, path)

    def export_weights(self, tensors: dict[str, torch.Tensor], metadata: dict) -> Path | None:
        """Write ``tensors`` to ``output_dir/model.safetensors`` with ``metadata`` (rank 0)."""
        if not self.writes:
            return None
        return save_safetensors(tensors, self.directory / WEIGHTS_NAME, metadata)

    def log_size(self) -> int:
        """Bytes in the JSONL log (0 when there is none)."""
        path = None if self.directory is None else self.directory / LOG_NAME
        return path.stat().st_size if path is not None and path.exists() else 0

    def truncate_log(self, size: int) -> None:
        """Cut the JSONL log back to ``size`` bytes (drops lines written after the checkpoint being resumed)."""
        if not self.writes:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / LOG_NAME, "a+b") as f:
            f.truncate(size)

    def log(self, record: dict) -> None:
        """Append ``record`` as one strict-JSON line (NaN/inf become null)."""
        if not self.writes:
            return
        with open(self.directory / LOG_NAME, "a") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
