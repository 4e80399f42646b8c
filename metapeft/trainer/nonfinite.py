"""Non-finite values during training, found without a host sync per step.

Each step reports 0-dim "all finite" flags for what it computed, in causal order: the input batches, the losses,
the inner gradient, the hypergradient and the modulators after the outer update. The monitor keeps, on the device,
the first step and the first cause that went non-finite (``torch.where``; no ``.item()``). The trainer reads it
(one host sync) at log and checkpoint boundaries and before writing weights, every step on the CPU (where reading
costs nothing), and when a step raises (a NaN modulator stops the next forward; the cause is the earlier step's).
A checkpoint is therefore never written from a state that went non-finite, and the previous one stays.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.utils import get_total_norm

CAUSES = ("input batch", "loss", "gradient", "hypergradient", "modulator")


class NonFiniteError(FloatingPointError):
    """Training produced NaN or inf: ``cause`` (one of :data:`CAUSES`) first went non-finite at ``global_step``
    (the step count as logged, 1-based); ``detail`` says where, when known (e.g. which training sample)."""

    def __init__(self, cause: str, global_step: int, detail: str = "") -> None:
        self.cause, self.global_step, self.detail = cause, global_step, detail
        where = f" ({detail})" if detail else ""
        super().__init__(f"non-finite {cause} at global step {global_step}{where}: training stopped before writing "
                         "this state; the last checkpoint was written before it (lower lr / meta_lr, set "
                         "max_grad_norm, or check the data)")

    def __reduce__(self):
        """Rebuild from (cause, global_step, detail): the error crosses process boundaries (sweep workers)."""
        return type(self), (self.cause, self.global_step, self.detail)


def all_finite(tensors) -> torch.Tensor | None:
    """0-dim bool tensor: every element of the floating-point tensors in ``tensors`` is finite, from one fused
    max-abs norm (NaN and inf propagate through it, and unlike a 2-norm it cannot overflow); no host sync. None
    when no tensor is floating-point (integer images) or all are empty (a rank's empty shard). ``DTensor`` (FSDP2's
    sharded parameters and gradients) are checked on every rank's rows: a collective (a MIN over the ranks of the
    local flags, so every rank agrees), which every rank must reach together."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not any(isinstance(t, DTensor) for t in floats):
        return torch.isfinite(get_total_norm(floats, norm_type=math.inf)) if floats else None
    local = [t.to_local() if isinstance(t, DTensor) else t for t in floats]
    local = [t for t in local if t.numel()]
    device = floats[0].device
    flag = torch.isfinite(get_total_norm(local, norm_type=math.inf)).float() if local else torch.ones((), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag > 0


class NonFiniteMonitor:
    """The first non-finite step and cause, kept on ``device`` (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.first_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet
        self.first_cause = torch.zeros((), dtype=torch.int64, device=device)
        self._finite = torch.ones((), dtype=torch.bool, device=device)

    def observe(self, global_step: int, **finite: torch.Tensor) -> None:
        """Record step ``global_step``'s flags: keyword ``input_batch``, ``loss``, ``gradient``, ``hypergradient``,
        ``modulator`` (the :data:`CAUSES`), each a 0-dim bool tensor (True = finite); absent or None ones are
        skipped."""
        names = [cause.replace(" ", "_") for cause in CAUSES]
        unknown = set(finite) - set(names)
        if unknown:
            raise ValueError(f"unknown flags {sorted(unknown)}; known: {names}")
        bad = ~torch.stack([self._finite if finite.get(name) is None else finite[name] for name in names])
        cause = torch.where(bad.any(), bad.int().argmax() + 1, 0)  # 1 + index of the first bad flag in CAUSES
        fresh = (self.first_step == 0) & (cause > 0)
        self.first_step = torch.where(fresh, global_step, self.first_step)
        self.first_cause = torch.where(fresh, cause, self.first_cause)

    def raise_if_bad(self, during: BaseException | None = None) -> None:
        """Raise :class:`NonFiniteError` (from ``during``, the error a step raised, if given) when any observed step
        went non-finite (one host sync)."""
        step, cause = torch.stack([self.first_step, self.first_cause]).tolist()
        if step:
            raise NonFiniteError(CAUSES[cause - 1], step) from during
