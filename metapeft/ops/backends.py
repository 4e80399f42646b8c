"""Backend registry: which implementations of the metapeft ops exist, and why one cannot run an input.

Every op family (``scaled_lora``, ``adapter``) dispatches through the same registry. A backend says
whether it is usable at all (``unavailable_reason``) and whether it can run a given input
(``not_supported_reasons``); dispatch picks the first capable backend for ``"auto"`` and raises a
clear error, listing the reasons, when an explicitly requested backend cannot run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BACKEND_ENV = "METAPEFT_BACKEND"
BACKEND_NAMES = ("cuda", "triton", "torch")


@dataclass
class Backend:
    """One implementation of the metapeft ops.

    ``unavailable_reason()`` returns why the backend cannot run at all in this process (``None`` when
    it can); ``device_types`` are the tensor device types it runs on when asked by name, and
    ``auto_device_types`` those on which ``"auto"`` may pick it (default: the same).
    """

    name: str
    device_types: tuple[str, ...]
    auto_device_types: tuple[str, ...] | None = None
    unavailable_reason: Callable[[], str | None] = lambda: None
    extra_checks: list[Callable[[torch.Tensor], str | None]] = field(default_factory=list)

    def not_supported_reasons(self, x: torch.Tensor) -> list[str]:
        """Why this backend cannot run an op whose main input is ``x`` (empty list: it can)."""
        reasons = []
        unavailable = self.unavailable_reason()
        if unavailable is not None:
            reasons.append(unavailable)
        if x.device.type not in self.device_types:
            reasons.append(f"runs on {'/'.join(self.device_types)} tensors, got a {x.device.type} tensor")
        reasons.extend(r for check in self.extra_checks if (r := check(x)) is not None)
        return reasons


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry; names must be one of ``BACKEND_NAMES``."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {backend.name!r}")
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def available_backends() -> dict[str, str | None]:
    """Map every registered backend to ``None`` (usable here) or the reason it is not."""
    return {name: _REGISTRY[name].unavailable_reason() for name in BACKEND_NAMES if name in _REGISTRY}


def validate_backend_name(backend: str) -> str:
    """Check a user's ``backend=`` argument early (at layer construction)."""
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def select_backend(requested: str, x: torch.Tensor) -> str:
    """Resolve ``requested`` ("auto" or a backend name) for input ``x``.

    ``METAPEFT_BACKEND`` overrides ``"auto"``. An explicit request that cannot run raises a
    ``RuntimeError`` naming the backend and its reasons; it never falls back silently.
    """
    if requested == "auto":
        requested = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if requested != "auto" and requested not in BACKEND_NAMES:
            raise ValueError(f"{BACKEND_ENV} must be 'auto' or one of {BACKEND_NAMES}, got {requested!r}")
    if requested != "auto":
        reasons = get_backend(requested).not_supported_reasons(x)
        if reasons:
            raise RuntimeError(f"backend {requested!r} cannot run this input: " + "; ".join(reasons))
        return requested
    all_reasons = {}
    for name in BACKEND_NAMES:
        if name not in _REGISTRY:
            continue
        backend = _REGISTRY[name]
        reasons = backend.not_supported_reasons(x)
        if backend.auto_device_types is not None and x.device.type not in backend.auto_device_types:
            reasons.append(f"'auto' picks it only for {'/'.join(backend.auto_device_types)} tensors")
        if not reasons:
            return name
        all_reasons[name] = reasons
    raise RuntimeError(f"no metapeft backend can run a {x.device.type} {x.dtype} input: {all_reasons}")


register_backend(Backend("torch", device_types=("cpu", "cuda", "mps", "xpu")))
