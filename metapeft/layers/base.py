"""What every metapeft PEFT module shares: a frozen base, PEFT weights (phi), modulators (rho), and the plumbing
around an op call (:meth:`MetaPEFTModule.run_op`: autocast, the dropout seed, ``last_backend``; the once-per-change
modulator check)."""

from __future__ import annotations

import torch
from torch import nn

from metapeft.modulator import check_constraint, gamma_from_modulator, modulator_for_gamma
from metapeft.ops.backends import validate_backend_name
from metapeft.ops.checks import check_finite, transforms_active
from metapeft.ops.family import FusedOp


def module_tensors(module: nn.Module, names: tuple[str, ...]) -> list[torch.Tensor | None]:
    """The tensors (or None) that ``getattr(module, name)`` returns for each of ``names``, read from the module's
    parameter and buffer dicts when they hold the name, by attribute access otherwise.

    Equal to attribute access: ``nn.Module`` keeps a registered name out of the instance dict, what
    ``torch.func.functional_call``, DDP and FSDP swap in lands in those dicts, and ``torch.nn.utils.parametrize``
    takes a parametrized name out of them (then the property answers). A dict read costs a fraction of
    ``nn.Module.__getattr__`` (per-call host times: ``benchmarks/results/host_overhead.md``).
    """
    params, buffers = module._parameters, module._buffers
    return [params[n] if n in params else buffers[n] if n in buffers else getattr(module, n) for n in names]


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed, an int64 scalar tensor drawn on ``device`` from torch's generator there: no host sync,
    reproducible under ``torch.manual_seed``, traced into a compiled graph (a fresh seed every compiled step) and
    fresh on every replay of a captured CUDA graph."""
    return torch.randint(0, 2**62, (), device=device)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast compute dtype active for ``x``'s device type, or None outside autocast (then one C call:
    ``torch._C._is_any_autocast_enabled``, what ``nn.RNN`` and dynamo consult too)."""
    if not torch._C._is_any_autocast_enabled():
        return None
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


GAMMA_GRANULARITIES = ("scalar", "channel")


def check_gamma_granularity(gamma: str) -> str:
    """Validate a ``gamma=`` argument: ``"scalar"`` (one gamma per module, per segment for a fused qkv: the paper) or
    ``"channel"`` (one per output channel: the authors' code's modulator vector)."""
    if gamma not in GAMMA_GRANULARITIES:
        raise ValueError(f"gamma must be one of {GAMMA_GRANULARITIES}, got {gamma!r}")
    return gamma


def modulator_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The modulator's dtype for PEFT weights of ``weight_dtype``: float64 for float64 weights (gamma and its
    gradient keep float64 precision), float32 otherwise (bf16/fp16 models keep an fp32 gamma)."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


class MetaPEFTModule(nn.Module):
    """Base class of metapeft PEFT modules.

    Subclasses register their PEFT weights by name in ``peft_parameter_names``, call :meth:`_init_modulator`,
    and implement :meth:`check_parameters` (the op's argument checks on everything but the input, run when the
    module is built and after ``.to()`` / ``.cuda()`` / ``.half()``, never per call). ``meta=True`` makes the
    modulator an ``nn.Parameter`` (learned by the outer loop); ``meta=False`` makes it a buffer, a fixed scale
    (plain PEFT, the baseline). ``last_backend`` names the backend the last forward ran.
    """

    peft_parameter_names: tuple[str, ...] = ()

    def _init_modulator(
        self, count: int, init_gamma: float, constraint: str, meta: bool, backend: str, weight: torch.Tensor
    ) -> None:
        self.constraint = check_constraint(constraint)
        self.backend = validate_backend_name(backend)
        self.meta = bool(meta)
        self.last_backend: str | None = None
        self._checked_modulator: tuple[int, int] | None = None
        value = torch.full((count,), modulator_for_gamma(init_gamma, constraint), device=weight.device,
                           dtype=modulator_dtype(weight.dtype))
        if self.meta:
            self.modulator = nn.Parameter(value)
        else:
            self.register_buffer("modulator", value)

    @property
    def gamma(self) -> torch.Tensor:
        """The modulator after its constraint: (count,), >= 0 with ``constraint="softplus"``."""
        return gamma_from_modulator(self.modulator, self.constraint)

    def peft_parameters(self) -> list[nn.Parameter]:
        """This module's PEFT weights (its part of phi, :func:`metapeft.params.trainable_phi`), not its modulator
        and not the frozen base."""
        return [getattr(self, name) for name in self.peft_parameter_names]

    def meta_parameters(self) -> list[nn.Parameter]:
        """This module's modulator (rho) when it is learnable, else nothing."""
        return [self.modulator] if self.meta else []

    def run_op(self, op: FusedOp, x: torch.Tensor, args: tuple, modulator: torch.Tensor, constraint: str,
               factor: float, extra: tuple = ()) -> torch.Tensor:
        """``op`` on x (..., K) with the family's arguments object ``args`` and ``scale = factor * gamma(modulator)``
        (``constraint``): under autocast x and ``args`` are cast to the autocast dtype and the op runs with autocast
        off (the modulator keeps its dtype); in training mode a fresh dropout seed is drawn on x's device;
        ``last_backend`` records the backend that ran."""
        if torch._C._is_any_autocast_enabled():  # one C call when autocast is off
            dtype = autocast_dtype(x)
            if dtype is not None:
                with torch.autocast(x.device.type, enabled=False):
                    args = tuple(None if t is None else t.to(dtype) for t in args)
                    return self.run_op(op, x.to(dtype), args, modulator, constraint, factor, extra)
        dropout = self.dropout if self.training else 0.0
        seed = draw_dropout_seed(x.device) if dropout > 0.0 else None
        out, backend = op.call(x, args, modulator, constraint, factor, extra, dropout, seed, self.backend)
        # nn.Module.__setattr__ costs more than the comparison; compiled code writes without reading (no guard on it)
        if torch.compiler.is_compiling() or backend != self.last_backend:
            self.last_backend = backend
        return out

    def check_parameters(self) -> None:
        """Raise naming the first parameter the op cannot run (shapes, dtypes, devices)."""
        raise NotImplementedError

    def check_modulator(self, modulator: torch.Tensor) -> None:
        """Raise if ``modulator`` (this module's, as the forward read it) holds NaN or inf, reading it only when it
        changed since the last check.

        Its version counter changes with every in-place update (optimizer step, ``load_state_dict``, assignment
        under ``no_grad``), so a forward pays a host read once per update instead of once per call; on CUDA the
        read needs ``METAPEFT_CHECK_FINITE=1`` (see :func:`metapeft.ops.checks.check_finite`). Skipped while
        compiling and inside ``torch.func`` transforms.
        """
        if torch.compiler.is_compiling() or transforms_active():
            return
        state = (id(modulator), modulator._version)
        if state != self._checked_modulator:
            check_finite(modulator, f"modulator of {type(self).__name__}")
            self._checked_modulator = state

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``.to()``, ``.cuda()``, ``.half()``...), then the modulator dtype rule and the
        parameter checks: a module cast to bf16 keeps an fp32 modulator, one cast to float64 a float64 one."""
        super()._apply(fn, recurse)
        wanted = modulator_dtype(self.modulator.dtype)
        if self.modulator.dtype != wanted:
            self.modulator.data = self.modulator.data.to(wanted)
        self._checked_modulator = None
        self.check_parameters()
        return self
