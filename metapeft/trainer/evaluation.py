"""Passes over a dataset in eval mode: the confusion matrix of a model's predictions (its metrics) and the class sums
of the features entering its head (the cosine head's initialisation)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from metapeft.metrics import metrics_from_confusion
from metapeft.trainer.model_setup import batch_to_device, parameter_dtype


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block, its previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def confusion_counts(model: nn.Module, batches: Iterable, num_classes: int, device: torch.device,
                     dtype: torch.dtype, autocast: Callable[[], object] = contextlib.nullcontext) -> torch.Tensor:
    """(C, C) float64 counts ``[true, predicted]`` on ``device`` of ``model``'s argmax predictions (raw logits) over
    ``batches`` of ``(x, y)`` (moved by :func:`batch_to_device`); the forward runs under ``autocast()``."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    with eval_mode(model):
        for batch in batches:
            x, y = batch_to_device(batch, device, dtype)
            with autocast():
                predictions = model(x).argmax(dim=-1)
            cm.view(-1).index_add_(0, y * num_classes + predictions, torch.ones_like(y, dtype=torch.float64))
    return cm


@torch.no_grad()
def class_feature_sums(model: nn.Module, head: nn.Module, batches: Iterable, num_classes: int, device: torch.device,
                       dtype: torch.dtype, autocast: Callable[[], object] = contextlib.nullcontext
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums (C, D) float64 of the features entering ``head`` (D = ``head.in_features``) and the class
    counts (C,) float64, on ``device``, over ``batches`` of ``(x, y)`` (moved by :func:`batch_to_device`), forwards
    in eval mode under ``autocast()``."""
    captured = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    sums = torch.zeros(num_classes, head.in_features, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    try:
        with eval_mode(model):
            for batch in batches:
                x, y = batch_to_device(batch, device, dtype)
                captured.clear()
                with autocast():
                    model(x)
                sums.index_add_(0, y, captured[-1].reshape(len(y), -1).double())
                counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    finally:
        hook.remove()
    return sums, counts


def evaluate_model(model: nn.Module, dataset, num_classes: int, class_split: dict[str, list[int]] | None = None,
                   batch_size: int = 256, num_workers: int = 0, progress: bool = False) -> dict:
    """Metrics (:func:`metapeft.metrics.metrics_from_confusion`) of ``model``'s argmax predictions on ``dataset``
    (items ``(x, int label)``), on the device and in the dtype of the model's parameters, without autocast."""
    device = next(model.parameters()).device
    batches = tqdm(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers), desc="eval", leave=False,
                   disable=not progress)
    cm = confusion_counts(model, batches, num_classes, device, parameter_dtype(model))
    return metrics_from_confusion(cm.cpu(), class_split)
