"""What a trainer writes to its ``output_dir`` and reads back: the checkpoint, the JSONL log and the final weights.

- ``checkpoint.pt``: :meth:`MetaPEFTTrainer.state_dict` (an exact resume), written after each epoch, every
  ``save_every_steps`` steps, at ``max_steps`` and on a stop request;
- ``metrics.jsonl``: one strict-JSON record per line, every ``log_every`` steps, each epoch and evaluation;
- ``model.safetensors``: the trained tensors (:func:`trained_tensors`), when ``fit`` finishes.

Only rank 0 writes; files are replaced atomically (:mod:`metapeft.atomic_files`). A checkpoint records how many bytes
of the log existed when it was written, so a resume cuts the log back to that point and the resumed run's log equals
an uninterrupted run's. It also records what it continues (:func:`run_fingerprint`: the training and validation
sets' sizes, labels and a few samples' content, and a digest of every frozen tensor), and a resume refuses a
mismatch (:func:`check_same_run`), naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from metapeft.atomic_files import LoadError, check_tensors_fit, content_digest, save_checkpoint, save_safetensors
from metapeft.data.seeded import item_digest
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


def check_trained_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], full: bool, source: str) -> None:
    """:class:`~metapeft.atomic_files.LoadError` naming ``source`` unless ``tensors`` are exactly the tensors a run of
    ``model`` saves (:func:`trained_tensor_names`), with the model's shapes and dtypes."""
    current = model.state_dict()
    check_tensors_fit(tensors, {name: current[name] for name in trained_tensor_names(model, full)}, source)


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict | None, name: str, source: str) -> None:
    """:class:`~metapeft.atomic_files.LoadError` naming ``source`` unless ``saved`` (an optimizer state dict) covers
    as many parameters as ``optimizer`` with per-parameter buffers (momentum, Adam moments) of their shapes."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise LoadError(f"{source} does not fit the trainer: no {name} state")
    count = sum(len(group["params"]) for group in saved["param_groups"])
    if count != len(params):
        raise LoadError(f"{source} does not fit the trainer: its {name} holds {count} parameters, the trainer's "
                        f"{len(params)}")
    problems = [f"{name} state {index}.{key}: shape {tuple(value.shape)} != parameter shape "
                f"{tuple(params[int(index)].shape)}"
                for index, buffers in saved["state"].items() for key, value in buffers.items()
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != params[int(index)].shape]
    if problems:
        raise LoadError(f"{source} does not fit the trainer: " + "; ".join(problems[:5]))


def data_fingerprint(dataset, labels: torch.Tensor) -> dict:
    """A dataset's ``length``, a digest of its ``labels`` and digests of its first, middle and last ``samples``
    (:func:`~metapeft.data.seeded.item_digest`); None for no dataset."""
    if dataset is None:
        return None
    n = len(labels)
    probes = sorted({0, n // 2, n - 1}) if n else []
    return {"length": n, "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16],
            "samples": {str(i): item_digest(dataset, i) for i in probes}}


def frozen_fingerprint(model: nn.Module, full: bool) -> dict[str, str]:
    """A 16-hex-digit digest per state-dict tensor a run does not save (:func:`trained_tensor_names`): the frozen
    backbone the checkpoint continues from (empty with ``full``, whose checkpoints hold every tensor)."""
    trained = set(trained_tensor_names(model, full))
    return {name: content_digest(tensor)[:16] for name, tensor in model.state_dict().items() if name not in trained}


def run_fingerprint(model: nn.Module, full: bool, train: tuple, val: tuple) -> dict:
    """What a checkpoint continues: ``train_set`` and ``val_set`` (:func:`data_fingerprint` of ``(dataset,
    labels)``) and the ``frozen`` tensors (:func:`frozen_fingerprint`)."""
    return {"train_set": data_fingerprint(*train), "val_set": data_fingerprint(*val),
            "frozen": frozen_fingerprint(model, full)}


def _fingerprint_differences(saved: dict, current: dict) -> list[str]:
    differences = []
    for name in ("train_set", "val_set"):
        before, now = saved.get(name), current.get(name)
        if (before is None) != (now is None):
            differences.append(f"{name} {'given' if now is not None else 'absent'} now, "
                               f"{'given' if before is not None else 'absent'} in the checkpoint")
        elif before is not None:
            differences += [f"{name} {key}: {before[key]} in the checkpoint, {now[key]} now"
                            for key in ("length", "labels") if before[key] != now[key]]
            changed = sorted(int(k) for k in now["samples"] if before["samples"].get(k) != now["samples"][k])
            if changed and before["length"] == now["length"]:
                differences.append(f"{name} content: sample(s) {changed} differ")
    frozen_before, frozen_now = saved.get("frozen", {}), current.get("frozen", {})
    changed = sorted(name for name in frozen_before.keys() | frozen_now.keys()
                     if frozen_before.get(name) != frozen_now.get(name))
    if changed:
        differences.append(f"frozen weights: {len(changed)} tensor(s) differ {changed[:5]}"
                           + (" ..." if len(changed) > 5 else ""))
    return differences


def check_same_run(saved: dict | None, current: dict, source: str) -> None:
    """:class:`~metapeft.atomic_files.LoadError` naming ``source`` and every difference when the checkpoint's
    :func:`run_fingerprint` differs from the trainer's (other data, another frozen backbone); checkpoints written
    before fingerprints existed (None) are not checked."""
    if saved is None:
        return
    differences = _fingerprint_differences(saved, current)
    if differences:
        raise LoadError(f"{source} continues a different run: " + "; ".join(differences) + " (resume with the same "
                        "data and backbone, or start a new run)")


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
