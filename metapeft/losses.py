"""Losses for long-tailed classification: logit-adjusted cross-entropy (Menon et al., 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def class_log_prior(class_counts: torch.Tensor | list[int]) -> torch.Tensor:
    """log of the class prior ``n_c / sum(n)`` as float32 (C,). A class absent from the counts is treated as
    having one sample, so its adjustment stays finite (a ``-inf`` logit would poison second derivatives)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("class_counts must be >= 0")
    counts = counts.clamp_min(1.0)
    return (counts / counts.sum()).log().float()


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy on ``logits + tau * log(prior)`` (training only; predict with the raw logits).

    Args:
        class_counts: (C,) training samples per class.
        tau: adjustment strength; 0 gives plain cross-entropy.
    Call: ``logits`` (B, C) float, ``targets`` (B,) int64 -> mean loss, a scalar in the logits' dtype.
    """

    def __init__(self, class_counts: torch.Tensor | list[int], tau: float = 1.0) -> None:
        super().__init__()
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        self.tau = float(tau)
        self.register_buffer("log_prior", class_log_prior(class_counts))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.log_prior.numel():
            raise ValueError(f"logits must be (B, {self.log_prior.numel()}), got {tuple(logits.shape)}")
        adjusted = logits + self.tau * self.log_prior.to(logits.dtype)
        return F.cross_entropy(adjusted, targets)
