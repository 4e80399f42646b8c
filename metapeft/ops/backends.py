"""The backend registry: per op family, each backend's forward, backward, dropout rule and capability checks.

One registry serves every op family (``scaled_lora``, ``adapter``). A :class:`Backend` says whether it can run
in this process at all (``unavailable_reason``, evaluated once per process) and whether it can run a given input
(:meth:`Backend.not_supported_reasons`: device type, dtype, the op family). :func:`select_backend` resolves a
requested name ("auto" or a backend) for an input; the dispatch point of each op family
(``FusedOp.call`` in ``metapeft.ops.family``) is its only caller, and it reports the backend that ran.

What decides a selection (the family, the request, ``METAPEFT_BACKEND``, the input's device type and dtype) is
fixed per process for a given key, so each answer is cached: a forward pays one dictionary lookup, not a scan of
the registry. :func:`refresh_backends` drops every cached answer and re-reads availability and the environment
(e.g. after a test changes ``METAPEFT_BACKEND``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

BACKEND_ENV = "METAPEFT_BACKEND"
BACKEND_NAMES = ("cuda", "triton", "torch")  # the order in which "auto" tries them
# The shipped CUDA default (changed only by a deliberate commit of a GPU check's recommendation); a GPU check run
# on a user's machine records its own in the user's cache, read first (:func:`recorded_default_file`).
GPU_DEFAULT_FILE = Path(__file__).with_name("gpu_default.json")
FAMILIES = ("scaled_lora", "adapter")


@dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of one op family.

    ``forward`` and ``backward`` are launchers with the signatures of the family's torch implementation
    (``metapeft.ops.scaled_lora_torch`` / ``metapeft.ops.adapter_torch``). ``dropout(x (M, K), p, seed)`` returns
    the factors the launchers apply to x: 1/(1-p) where they keep an element, 0 elsewhere; the differentiable
    paths (double backward, forward-mode AD, ``torch.func``) use it to reproduce this backend's mask exactly.
    """

    forward: Callable
    backward: Callable
    dropout: Callable


@dataclass
class Backend:
    """One implementation of the metapeft ops.

    ``unavailable_reason()`` returns why the backend cannot run at all in this process (``None`` when it can);
    ``device_types`` are the tensor device types it runs when asked by name, ``auto_device_types`` those on
    which "auto" may pick it (default: the same); ``input_checks`` each return, from an input's device type and
    dtype, why it cannot run (or ``None``); ``ops`` maps an op family to its :class:`OpImpl`.
    """

    name: str
    device_types: tuple[str, ...]
    auto_device_types: tuple[str, ...] | None = None
    unavailable_reason: Callable[[], str | None] = lambda: None
    input_checks: list[Callable[[str, torch.dtype], str | None]] = field(default_factory=list)
    ops: dict[str, OpImpl] = field(default_factory=dict)

    def not_supported_reasons(self, device_type: str, dtype: torch.dtype, family: str = "scaled_lora") -> list[str]:
        """Why this backend cannot run op ``family`` on an input of ``device_type`` and ``dtype`` (empty: it can)."""
        reasons = []
        unavailable = available_backends()[self.name]
        if unavailable is not None:
            reasons.append(unavailable)
        if family not in self.ops:
            reasons.append(f"has no {family} implementation")
        if device_type not in self.device_types:
            reasons.append(f"runs on {'/'.join(self.device_types)} tensors, got a {device_type} tensor")
        reasons.extend(r for check in self.input_checks if (r := check(device_type, dtype)) is not None)
        return reasons


_REGISTRY: dict[str, Backend] = {}
_AVAILABILITY: dict[str, str | None] = {}
_SELECTIONS: dict[tuple, tuple[str | None, str]] = {}  # (name, "") or (None, why not)
_ENV_REQUEST: list[str] = []  # the "auto" override read from METAPEFT_BACKEND, one entry once read
_GPU_DEFAULT: list[str | None] = []  # the recorded CUDA default, one entry once read


# How many double_backward_ahead() blocks are open (any thread: it picks a route, never changes a result).
DOUBLE_BACKWARD_AHEAD = [0]


@contextlib.contextmanager
def double_backward_ahead() -> Iterator[None]:
    """Inside the block the ops record forwards whose backward will itself be differentiated (the train pass of
    an exact meta step): an eager torch-backend call then runs through the op's ``autograd.Function``, whose
    differentiable backward recomputes what it needs, instead of autograd's double backward of the composite
    forward. Same math, less peak memory for an exact meta step at the same time
    (``benchmarks/results/meta_step_cpu.md``, exact mode). Outside the block the composite forward is the cheaper route
    per call."""
    DOUBLE_BACKWARD_AHEAD[0] += 1
    try:
        yield
    finally:
        DOUBLE_BACKWARD_AHEAD[0] -= 1


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; its name must be one of ``BACKEND_NAMES``."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {backend.name!r}")
    _REGISTRY[backend.name] = backend
    refresh_backends()


def register_op(backend: str, family: str, impl: OpImpl) -> None:
    """Add ``family``'s implementation to the registered backend called ``backend``."""
    if family not in FAMILIES:
        raise ValueError(f"op family must be one of {FAMILIES}, got {family!r}")
    get_backend(backend).ops[family] = impl
    refresh_backends()


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def op_impl(backend: str, family: str) -> OpImpl:
    """``backend``'s implementation of ``family`` (a ``KeyError`` when it has none: select first)."""
    return _REGISTRY[backend].ops[family]


def refresh_backends() -> None:
    """Forget every cached answer: availability, ``METAPEFT_BACKEND`` and selections are computed anew."""
    _AVAILABILITY.clear()
    _SELECTIONS.clear()
    _ENV_REQUEST.clear()
    _GPU_DEFAULT.clear()


def recorded_default_file() -> Path | None:
    """Where the recorded CUDA default is read from: ``gpu_default.json`` in the user's cache (``$METAPEFT_CACHE``,
    else ``$XDG_CACHE_HOME/metapeft``, else ``~/.cache/metapeft``; written by ``benchmarks/gpu_check.py`` run on
    this machine) first, then the shipped ``GPU_DEFAULT_FILE``; None when neither exists."""
    cache = os.environ.get("METAPEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "metapeft")
    return next((p for p in (Path(cache) / "gpu_default.json", GPU_DEFAULT_FILE) if p.is_file()), None)


def recorded_cuda_default_backend(path: Path | None = None) -> str | None:
    """The backend a recorded GPU check chose for CUDA tensors (``cuda_default_backend`` in ``path``, default
    :func:`recorded_default_file`), or None when none is recorded; a name that is not a backend is an error naming
    the file."""
    path = recorded_default_file() if path is None else path
    if path is None or not path.is_file():
        return None
    name = json.loads(path.read_text()).get("cuda_default_backend")
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"{path}: cuda_default_backend must be one of {BACKEND_NAMES} or null, got {name!r}")
    return name


def auto_order(device_type: str) -> tuple[str, ...]:
    """The order in which "auto" tries the backends for tensors on ``device_type``: on CUDA the recorded GPU
    default first (:func:`recorded_cuda_default_backend`, read once per process), otherwise ``BACKEND_NAMES``."""
    if not _GPU_DEFAULT:
        _GPU_DEFAULT.append(recorded_cuda_default_backend())
    preferred = _GPU_DEFAULT[0] if device_type == "cuda" else None
    return BACKEND_NAMES if preferred is None else (preferred, *(n for n in BACKEND_NAMES if n != preferred))


def available_backends() -> dict[str, str | None]:
    """Map every registered backend to ``None`` (usable in this process) or the reason it is not (cached)."""
    if len(_AVAILABILITY) != len(_REGISTRY):
        _AVAILABILITY.update({name: _REGISTRY[name].unavailable_reason() for name in BACKEND_NAMES
                              if name in _REGISTRY})
    return dict(_AVAILABILITY)


def validate_backend_name(backend: str) -> str:
    """Check a user's ``backend=`` argument early (at layer construction)."""
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def _env_request() -> str:
    if not _ENV_REQUEST:
        requested = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if requested != "auto" and requested not in BACKEND_NAMES:
            raise ValueError(f"{BACKEND_ENV} must be 'auto' or one of {BACKEND_NAMES}, got {requested!r}")
        _ENV_REQUEST.append(requested)
    return _ENV_REQUEST[0]


@torch.compiler.assume_constant_result
def _resolve(family: str, requested: str, device_type: str, dtype: torch.dtype) -> tuple[str | None, str]:
    """``(backend name, "")`` or ``(None, why no backend can run)`` for op ``family``, the request ("auto" or a
    name) and an input's device type and dtype. A constant to ``torch.compile``: the compiler calls it while
    tracing (it reads files, the environment and imports, which cannot be traced) and uses its answer."""
    if requested == "auto":
        requested = _env_request()
    if requested != "auto":
        reasons = get_backend(requested).not_supported_reasons(device_type, dtype, family)
        if reasons:
            return None, f"backend {requested!r} cannot run this input ({family}): " + "; ".join(reasons)
        return requested, ""
    all_reasons = {}
    order = auto_order(device_type)
    for name in order:
        if name not in _REGISTRY:
            continue
        backend = _REGISTRY[name]
        reasons = backend.not_supported_reasons(device_type, dtype, family)
        recorded = order is not BACKEND_NAMES and name == order[0]  # a GPU check chose it for this device
        if backend.auto_device_types is not None and device_type not in backend.auto_device_types and not recorded:
            reasons.append(f"'auto' picks it only for {'/'.join(backend.auto_device_types) or 'no'} tensors")
        if not reasons:
            return name, ""
        all_reasons[name] = reasons
    return None, f"no metapeft backend can run a {device_type} {dtype} {family} input: {all_reasons}"


def select_backend(requested: str, x: torch.Tensor, family: str = "scaled_lora") -> str:
    """Resolve ``requested`` ("auto" or a backend name) for op ``family`` on input ``x``; cached per process
    (keyed by the request, ``x``'s device and dtype: a hit costs one dictionary lookup).

    ``METAPEFT_BACKEND`` overrides "auto". A request that cannot run raises a ``RuntimeError`` naming the
    backend and its reasons; it never falls back silently. Under ``torch.compile`` the selection is made while
    tracing and is a constant of the compiled code (``refresh_backends`` then does not change what an already
    compiled model runs; the eager cache is not read there, so filling it never recompiles anything).
    """
    if torch.compiler.is_compiling():  # a constant of the trace: no guard on the eager cache, no recompiles
        chosen = _resolve(family, requested, x.device.type, x.dtype)
    else:
        key = (family, requested, x.device, x.dtype)
        chosen = _SELECTIONS.get(key)
        if chosen is None:
            chosen = _SELECTIONS[key] = _resolve(family, requested, x.device.type, x.dtype)
    name, why_not = chosen
    if name is None:
        raise RuntimeError(why_not)
    return name


register_backend(Backend("torch", device_types=("cpu", "cuda", "mps", "xpu")))
