"""Files that are never torn, never non-finite and never loaded unchecked: checkpoints and safetensors.

A checkpoint is one ``torch.save`` file ``{"format", "sha256", "state"}`` of plain containers, tensors and numbers
(model and optimizer state dicts, scheduler state, RNG states, loop position), loaded with
``torch.load(weights_only=True)`` so loading never runs pickled code. Final weights and adapters are safetensors
files whose metadata carries a ``sha256`` of their content. Every write goes to a temporary file beside the target
(created with mode 0666 minus the umask), is fsynced and renamed over the target: a crash leaves the old file or the
new one; the temp name fits the file system's name limit whatever the target's length, and a write that fails for
want of space says so (``OSError`` ENOSPC naming the file). Every write refuses non-finite floating-point values.
Every load checks the format, the checksum and finiteness, and raises :class:`LoadError` naming the file and what
is wrong before the caller changes anything; a safetensors file is read through one open file descriptor, so a
writer replacing it meanwhile never makes it look corrupt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import stat
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

CHECKPOINT_FORMAT = "metapeft-checkpoint/1"
CHECKSUM_KEY = "sha256"
TEMPORARY_SUFFIX = ".tmp"
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs, APFS)
LOW_SPACE = 1 << 20  # bytes: a write that fails with less free than this failed for want of space


class LoadError(ValueError):
    """A file that cannot be loaded (unreadable, corrupt, foreign, non-finite, or not fitting the model); the
    message starts with the file's path."""


# ----- content digest and finiteness -------------------------------------------------------------------------------
def _leaves(value, path: str = "") -> Iterator[tuple[str, object]]:
    """``(dotted path, leaf)`` of a nested dict/list/tuple in a fixed order (dict insertion order)."""
    if isinstance(value, Mapping | list | tuple) and not value:
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}.{i}" if path else str(i))
    else:
        yield path, value


def content_digest(value) -> str:
    """sha256 (hex) of a nested container of tensors and plain values: structure, every leaf's path and type,
    and each tensor's dtype, shape and bytes. Equal for equal content wherever the tensors live."""
    digest = hashlib.sha256()
    for path, leaf in _leaves(value):
        if isinstance(leaf, torch.Tensor):
            tensor = leaf.detach().to("cpu").contiguous()
            digest.update(f"{path}:tensor:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        else:
            digest.update(f"{path}:{type(leaf).__name__}:{leaf!r};".encode())
    return digest.hexdigest()


def nonfinite_tensors(value) -> list[str]:
    """Dotted paths of the floating-point tensors in a nested container that hold NaN or +-inf (one host sync
    per device)."""
    floats = [(path, leaf) for path, leaf in _leaves(value)
              if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex())]
    if not floats:
        return []
    flags = {}
    for path, tensor in floats:
        flags.setdefault(tensor.device, []).append((path, torch.isfinite(tensor.detach()).all()))
    bad = []
    for entries in flags.values():
        finite = torch.stack([flag for _, flag in entries]).tolist()
        bad += [path for (path, _), ok in zip(entries, finite) if not ok]
    return bad


def _refuse_nonfinite(value, path: Path) -> None:
    bad = nonfinite_tensors(value)
    if bad:
        raise ValueError(f"refusing to write {path}: non-finite values (NaN or inf) in {len(bad)} tensor(s): "
                         f"{bad[:5]}")


def _check_finite_loaded(value, path: Path) -> None:
    bad = nonfinite_tensors(value)
    if bad:
        raise LoadError(f"{path}: non-finite values (NaN or inf) in {len(bad)} tensor(s): {bad[:5]}")


# ----- atomic writes -------------------------------------------------------------------------------------------------
def fit_file_name(name: str, limit: int = NAME_MAX) -> str:
    """``name`` cut to at most ``limit`` bytes of its UTF-8 encoding (whole characters), so that a name derived from
    it (a temp file, a run moved aside) stays a valid file name."""
    encoded = name.encode("utf-8", "surrogateescape")
    return name if len(encoded) <= limit else encoded[:limit].decode("utf-8", "ignore")


def _temporary_name(path: Path) -> Path:
    tail = f".{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
    return path.parent / f".{fit_file_name(path.name, NAME_MAX - 1 - len(tail))}{tail}"


def _free_bytes(directory: Path) -> int | None:
    try:
        usage = os.statvfs(directory)
    except OSError:
        return None
    return usage.f_bavail * usage.f_frsize


def _out_of_space(error: BaseException, directory: Path) -> int | None:
    """The free bytes left in ``directory``'s file system when ``error`` (from a write there) came from a full
    device (ENOSPC / EDQUOT, or torch's ``[enforce fail at inline_container.cc]`` with almost nothing free); None
    when it did not."""
    if not isinstance(error, Exception):
        return None
    free = _free_bytes(directory)
    said = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)
    return free if said or (free is not None and free < LOW_SPACE) else None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(temp_path)`` on a fresh temp file beside ``path`` (mode 0666 minus the umask), fsync it, then
    rename it over ``path``; the temp file is removed on any failure and ``path`` is left as it was. A full device
    raises ``OSError`` (errno ENOSPC) naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temporary_name(path)
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = stat.S_IMODE(temp.stat().st_mode)  # 0666 minus the umask, read without changing the umask
        write(str(temp))
        os.chmod(temp, mode)  # writers that recreate the file (safetensors) leave it 0600
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as error:
        free = _out_of_space(error, path.parent)  # measured before the temp file gives its space back
        temp.unlink(missing_ok=True)
        if free is not None:
            kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
            raise OSError(errno.ENOSPC, f"no space left on device: could not write {path} ({free} bytes free on its "
                                        f"file system; {kept})") from error
        raise
    return path


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files an interrupted :func:`atomic_write` left in ``directory`` (``.NAME.<32 hex>.tmp``);
    returns them. Only safe while no other process writes there (the run directory's lock)."""
    pattern = re.compile(r"\..+\.[0-9a-f]{32}" + re.escape(TEMPORARY_SUFFIX))
    stale = [p for p in Path(directory).iterdir() if p.is_file() and pattern.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ----- checkpoints ---------------------------------------------------------------------------------------------------
def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` ``state`` (containers of tensors, numbers, strings) to ``path`` with its
    :func:`content_digest`; refuses (``ValueError``, nothing written) a state with non-finite floats."""
    path = Path(path)
    _refuse_nonfinite(state, path)
    record = {"format": CHECKPOINT_FORMAT, CHECKSUM_KEY: content_digest(state), "state": state}
    return atomic_write(path, lambda temp: torch.save(record, temp))


def _unpickling_reason(error: Exception) -> str:
    """The line of a ``weights_only`` refusal that says what was refused (torch's text around it advises
    ``weights_only=False``, which would execute the file's code)."""
    match = re.search(r"WeightsUnpickler error: ([^\n]*)", str(error))
    return match.group(1).split(". ")[0] if match else type(error).__name__


def read_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """The object a ``torch.save`` file holds, loaded with ``torch.load(weights_only=True)``: tensors, numbers,
    strings and containers, never pickled code. Raises :class:`LoadError` naming the file and the problem
    (missing, empty, truncated or not a torch.save archive, objects ``weights_only`` refuses) without torch's
    advice to load with ``weights_only=False``."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise LoadError(f"{path}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise LoadError(f"{path}: refused: the file holds objects other than tensors, numbers, strings and "
                        f"containers ({_unpickling_reason(error)}); metapeft never loads pickled code, so a file "
                        "that needs it is not a metapeft checkpoint or was altered") from None
    except Exception as error:  # noqa: BLE001 - a corrupt archive fails anywhere in zip reading or unpickling
        first = str(error).split(". ")[0] or type(error).__name__
        raise LoadError(f"{path}: not a readable checkpoint: truncated or corrupt torch.save archive ({first})") \
            from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The state a :func:`save_checkpoint` file holds (:func:`read_torch_file`) after checking that it is a
    metapeft checkpoint, matches its checksum and holds only finite floats.

    Raises :class:`LoadError` naming the file and the problem (missing, empty, truncated or not a zip archive,
    refused objects, foreign format, checksum mismatch, non-finite values).
    """
    path = Path(path)
    record = read_torch_file(path, map_location)
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT or "state" not in record:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise LoadError(f"{path}: not a metapeft checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    if content_digest(record["state"]) != record.get(CHECKSUM_KEY):
        raise LoadError(f"{path}: checksum mismatch: the content differs from what was written (corrupted on "
                        "disk or edited)")
    _check_finite_loaded(record["state"], path)
    return record["state"]


# ----- safetensors ---------------------------------------------------------------------------------------------------
def _safetensors_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    return content_digest({"tensors": dict(sorted(tensors.items())),
                           "metadata": {k: v for k, v in sorted(metadata.items()) if k != CHECKSUM_KEY}})


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Atomically write ``tensors`` (name -> tensor) as a safetensors file; ``metadata`` values other than strings
    are stored as JSON and a ``sha256`` of tensors and metadata is added. Refuses non-finite floats."""
    path = Path(path)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    _refuse_nonfinite(tensors, path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta[CHECKSUM_KEY] = _safetensors_digest(tensors, meta)
    return atomic_write(path, lambda temp: save_file(tensors, temp, metadata=meta))


def _parse_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors by sorted name, metadata)`` of a safetensors file's bytes; :class:`LoadError` when they are not
    one."""
    try:
        (header_size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_size])
        metadata = dict(header.get("__metadata__") or {})
        return dict(sorted(load_safetensors_bytes(data).items())), metadata
    except (SafetensorError, struct.error, ValueError, TypeError, AttributeError, RuntimeError) as error:
        raise LoadError(f"{path}: not a readable safetensors file: truncated or corrupt ({error})") from None


def _verified_safetensors(data: bytes, path: Path, require_checksum: bool
                          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = _parse_safetensors(data, path)
    if CHECKSUM_KEY in metadata:
        if _safetensors_digest(tensors, metadata) != metadata[CHECKSUM_KEY]:
            raise LoadError(f"{path}: checksum mismatch: the content differs from what was written (corrupted on "
                            "disk or edited)")
    elif require_checksum:
        raise LoadError(f"{path}: no content checksum in its metadata (not written by this metapeft version)")
    return tensors, metadata


def _read_once(path: Path) -> tuple[bytes, os.stat_result]:
    """The bytes of ``path`` read through one open file descriptor, and that file's identity."""
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        raise LoadError(f"{path}: no such file") from None
    except OSError as error:
        raise LoadError(f"{path}: cannot be read ({error.strerror or error})") from None


def _replaced(path: Path, read: os.stat_result) -> bool:
    """Whether ``path`` now names another file than the one read (a writer renamed a new one over it)."""
    try:
        now = os.stat(path)
    except OSError:
        return True
    return (now.st_dev, now.st_ino, now.st_mtime_ns) != (read.st_dev, read.st_ino, read.st_mtime_ns)


def load_safetensors(path: str | os.PathLike, require_checksum: bool = True) -> tuple[dict[str, torch.Tensor],
                                                                                     dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, on the CPU, after checking it is readable, matches its
    ``sha256`` (required unless ``require_checksum=False``, e.g. for foreign backbone weights; checked whenever
    present) and holds only finite floats. Raises :class:`LoadError` naming the file and the problem.

    The file is read through one open file descriptor (a writer's atomic rename cannot tear the read); when a read
    fails its checks and the path was replaced meanwhile, it is read once more, and a file replaced again is
    reported as replaced, never as corrupt."""
    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{path}: a directory, not a safetensors file")
    for _ in range(2):
        data, read = _read_once(path)
        try:
            tensors, metadata = _verified_safetensors(data, path, require_checksum)
            break
        except LoadError:
            if not _replaced(path, read):
                raise
    else:
        raise LoadError(f"{path}: replaced by another process twice while being read; load it again once its "
                        "writer is done")
    _check_finite_loaded(tensors, path)
    return tensors, metadata


def check_tensors_fit(stored: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str,
                      required: set[str] | None = None) -> None:
    """Raise :class:`LoadError` (``"<source> does not fit the model: ..."``, listing every problem) unless every
    stored tensor has a name in ``expected`` with the same shape and dtype and every name in ``required``
    (default: all of ``expected``) is stored."""
    required = set(expected) if required is None else required
    problems = []
    absent, extra = sorted(required - set(stored)), sorted(set(stored) - set(expected))
    for kind, names in (("missing", absent), ("unexpected", extra)):
        if names:
            problems.append(f"{kind} {len(names)} tensor(s) {names[:5]}" + (" ..." if len(names) > 5 else ""))
    mismatched = []
    for key in (k for k in stored if k in expected):
        file_tensor, model_tensor = stored[key], expected[key]
        if file_tensor.shape != model_tensor.shape:
            mismatched.append(f"{key}: file shape {tuple(file_tensor.shape)} != model shape "
                              f"{tuple(model_tensor.shape)}")
        elif file_tensor.dtype != model_tensor.dtype:
            mismatched.append(f"{key}: file dtype {file_tensor.dtype} != model dtype {model_tensor.dtype}")
    problems += mismatched[:5] + ([f"... {len(mismatched) - 5} more"] if len(mismatched) > 5 else [])
    if problems:
        raise LoadError(f"{source} does not fit the model: " + "; ".join(problems))


def copy_into(targets: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor]) -> None:
    """``targets[k].copy_(stored[k])`` for every stored name, without autograd (after :func:`check_tensors_fit`)."""
    with torch.no_grad():
        for key, tensor in stored.items():
            targets[key].copy_(tensor)


# ----- random generators ---------------------------------------------------------------------------------------------
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
