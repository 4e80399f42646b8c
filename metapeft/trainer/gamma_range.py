"""Modulators that leave a sane range: a warning and a log record, once per module.

A meta learning rate far too large drives gamma to 1e6 or to 0.0 (softplus underflow) without any value going
non-finite: training "succeeds" with modules switched off or dominating. :class:`GammaRangeWatch` compares every
module's gamma with :data:`GAMMA_RANGE` where the trainer reads values anyway (log boundaries, epoch ends), warns
through the ``metapeft.trainer`` logger and returns a ``{"event": "gamma_range", ...}`` record for the metrics log.
What it has warned about is part of the checkpoint, so a resumed run logs exactly what an uninterrupted one does.
"""

from __future__ import annotations

import logging
import math

# gamma below 1e-4 switches a module off; above 1e4 its update outweighs the frozen weights by orders of magnitude
GAMMA_RANGE = (1e-4, 1e4)
logger = logging.getLogger("metapeft.trainer")


def outside_range(gammas: dict[str, list[float]], bounds: tuple[float, float] = GAMMA_RANGE
                  ) -> dict[str, list[float]]:
    """The modules (name -> gammas) with a gamma outside ``bounds`` (or non-finite)."""
    low, high = bounds
    return {name: values for name, values in gammas.items()
            if any(not (math.isfinite(g) and low <= g <= high) for g in values)}


class GammaRangeWatch:
    """Warns once per module whose gamma left :data:`GAMMA_RANGE` (module docstring)."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def check(self, gammas: dict[str, list[float]], position: dict) -> dict | None:
        """A log record (``position`` plus ``range`` and the offending ``modules``) for modules newly outside the
        range, after a warning; None when there are none."""
        fresh = {name: values for name, values in outside_range(gammas).items() if name not in self.warned}
        if not fresh:
            return None
        self.warned.update(fresh)
        shown = "; ".join(f"{name}: {values}" for name, values in list(fresh.items())[:5])
        logger.warning("gamma left the range [%g, %g] at global step %s in %d module(s): %s (lower meta_lr or "
                       "check the meta set)", *GAMMA_RANGE, position.get("global_step"), len(fresh), shown)
        return {"event": "gamma_range", **position, "range": list(GAMMA_RANGE), "modules": fresh}

    def state_dict(self) -> list[str]:
        """The modules already warned about, sorted."""
        return sorted(self.warned)

    def load_state_dict(self, warned: list[str]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.warned = set(warned)
