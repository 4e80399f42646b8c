"""What every metapeft PEFT module shares: a frozen base, PEFT weights (phi) and modulators (rho)."""

from __future__ import annotations

import torch
from torch import nn

from metapeft.modulator import check_constraint, gamma_from_modulator, modulator_for_gamma
from metapeft.ops.backends import validate_backend_name


class MetaPEFTModule(nn.Module):
    """Base class of metapeft PEFT modules.

    Subclasses register their PEFT weights by name in ``peft_parameter_names`` and call
    :meth:`_init_modulator`. ``meta=True`` makes the modulator an ``nn.Parameter`` (learned by the
    outer loop); ``meta=False`` makes it a buffer, a fixed scale (plain PEFT, the baseline).
    """

    peft_parameter_names: tuple[str, ...] = ()

    def _init_modulator(
        self, count: int, init_gamma: float, constraint: str, meta: bool, backend: str, device: torch.device
    ) -> None:
        self.constraint = check_constraint(constraint)
        self.backend = validate_backend_name(backend)
        self.meta = bool(meta)
        self.last_backend: str | None = None
        value = torch.full((count,), modulator_for_gamma(init_gamma, constraint), device=device)
        if self.meta:
            self.modulator = nn.Parameter(value)
        else:
            self.register_buffer("modulator", value)

    @property
    def gamma(self) -> torch.Tensor:
        """The modulator after its constraint: (count,), >= 0 with ``constraint="softplus"``."""
        return gamma_from_modulator(self.modulator, self.constraint)

    def peft_parameters(self) -> list[nn.Parameter]:
        """This module's PEFT weights (phi), not its modulator and not the frozen base."""
        return [getattr(self, name) for name in self.peft_parameter_names]

    def meta_parameters(self) -> list[nn.Parameter]:
        """This module's modulator (rho) when it is learnable, else nothing."""
        return [self.modulator] if self.meta else []
