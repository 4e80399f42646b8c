"""Tiny models and synthetic long-tailed datasets for the trainer tests."""

from __future__ import annotations

import torch
from torch import nn

import metapeft


class LongTailedBlobs(torch.utils.data.Dataset):
    """Gaussian blobs around random class centres, class sizes ``counts``; ``targets`` attribute present
    unless ``with_targets=False``. Items: (x (dim,) float32, int label)."""

    def __init__(self, counts: list[int], dim: int = 12, noise: float = 1.0, seed: int = 1,
                 with_targets: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(len(counts), dim, generator=g) * 2
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        labels = labels[torch.randperm(labels.numel(), generator=g)]
        self.x = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=g)
        self.labels = labels.tolist()
        if with_targets:
            self.targets = self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], self.labels[i]


class TinyNet(nn.Module):
    """Frozen two-layer MLP with a FusedMetaLoRA on each Linear, and a Linear ``head``."""

    def __init__(self, dim: int = 12, hidden: int = 16, num_classes: int = 4, rank: int = 2, dropout: float = 0.0,
                 meta: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.l1 = metapeft.FusedMetaLoRA(nn.Linear(dim, hidden, dtype=dtype), rank, dropout=dropout, meta=meta)
        self.l2 = metapeft.FusedMetaLoRA(nn.Linear(hidden, hidden, dtype=dtype), rank, dropout=dropout, meta=meta)
        self.head = nn.Linear(hidden, num_classes, dtype=dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.l2(torch.tanh(self.l1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_net_with_random_lora(dtype: torch.dtype = torch.float64) -> TinyNet:
    """:class:`TinyNet` with standard-normal LoRA B (zero at init): the modulators' gradients are nonzero."""
    model = TinyNet(dtype=dtype)
    with torch.no_grad():
        for layer in (model.l1, model.l2):
            layer.lora_B.normal_()
    return model


def first_meta_step_inputs(trainer, data: LongTailedBlobs, counts: list[int], batch_size: int = 16):
    """What the trainer's first meta step sees, for an independent recomputation: ``(batch_indices, (x, y), val,
    loss_fn)`` with the first ``batch_size`` samples as the train batch, the trainer's own first meta batch as val
    (float64), and the logit-adjusted loss of ``counts``."""
    from metapeft.losses import LogitAdjustedLoss

    batch_indices = torch.arange(batch_size)
    train = (data.x[batch_indices].double(), torch.tensor(data.labels)[batch_indices])
    meta_indices = trainer.meta_sampler.meta_batch(0, batch_indices)
    val = (data.x[meta_indices].double(), torch.tensor(data.labels)[meta_indices])
    criterion = LogitAdjustedLoss(counts).double()

    def loss_fn(model, batch):
        return criterion(model(batch[0]), batch[1])

    return batch_indices, train, val, loss_fn
