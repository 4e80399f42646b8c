"""Checkpoints: atomic writes (temp file + ``os.replace``), ``weights_only`` loading, RNG state capture.

A checkpoint is one ``torch.save`` file of plain containers, tensors and numbers (model and optimizer
state dicts, scheduler state, RNG states, loop position), loaded with ``torch.load(weights_only=True)``
so loading never runs pickled code. Final weights are exported as safetensors.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(temp_path)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    return path


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` ``state`` (containers of tensors, numbers, strings) to ``path``."""
    return _atomic_write(path, lambda temp: torch.save(state, temp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``."""
    return torch.load(path, map_location=map_location, weights_only=True)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Atomically write ``tensors`` (name -> tensor) as a safetensors file; ``metadata`` values become strings."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return _atomic_write(path, lambda temp: save_file(tensors, temp, metadata=meta))


def rng_state() -> dict:
    """Python, NumPy, torch CPU and (if present) CUDA generator states, ``weights_only``-loadable."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generator states captured by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
