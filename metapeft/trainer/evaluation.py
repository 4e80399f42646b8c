"""Passes over a dataset in eval mode: the confusion matrix of a model's predictions (its metrics) and the class sums
of the features entering its head (the cosine head's initialisation).

Every pass checks what it reads (:class:`SampleChecks`): a label outside ``[0, num_classes)`` is refused as its batch
arrives (on the host, before the transfer), and non-finite images, logits or features are refused at the end of the
pass (flags kept on the device: one host read per pass), each error naming the dataset index of the first bad sample.
NaN logits would otherwise argmax to class 0 and give a plausible accuracy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from metapeft.data.shards import batch_to_device
from metapeft.metrics import metrics_from_confusion
from metapeft.trainer.model_setup import parameter_dtype


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block, its previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _dataset_index(flagged: list[tuple[int, torch.Tensor]], position: int) -> int:
    """The dataset index of sample ``position`` of a pass whose batches start at the given indices."""
    for start, flags in flagged:
        if position < len(flags):
            return start + position
        position -= len(flags)
    raise IndexError(position)


class SampleChecks:
    """The checks of one pass over ``what`` (a dataset's name in errors) whose first sample has dataset index
    ``first_index`` (module docstring). Call :meth:`arrived` with each batch as loaded, :meth:`computed` with its
    device tensors, :meth:`raise_if_nonfinite` after the pass."""

    def __init__(self, what: str, num_classes: int, first_index: int = 0) -> None:
        self.what, self.num_classes, self.next_index = what, num_classes, first_index
        self.batch_start = first_index
        self.rows: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def arrived(self, batch) -> None:
        """Refuse labels outside ``[0, num_classes)`` in ``batch`` = ``(x, y)``, naming the first one's index."""
        y = torch.as_tensor(batch[1])
        bad = ((y < 0) | (y >= self.num_classes)).nonzero()
        if bad.numel():
            position = int(bad[0, 0])
            raise ValueError(f"{self.what} sample {self.next_index + position} has label {int(y[position])}, outside "
                             f"[0, {self.num_classes}) (num_classes {self.num_classes})")
        self.batch_start, self.next_index = self.next_index, self.next_index + len(y)

    def computed(self, **tensors: torch.Tensor) -> None:
        """Flag, per sample and on the device, whether each named (B, ...) tensor of the last batch is finite."""
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                finite = torch.isfinite(tensor.detach().reshape(len(tensor), -1)).all(dim=1)
                self.rows.setdefault(name, []).append((self.batch_start, finite))

    def raise_if_nonfinite(self) -> None:
        """``ValueError`` naming the first sample whose flagged tensors held NaN or inf (inputs before outputs)."""
        for name, flagged in self.rows.items():
            finite = torch.cat([flags for _, flags in flagged])
            if bool(finite.all()):
                continue
            index = _dataset_index(flagged, int((~finite).nonzero()[0, 0]))
            raise ValueError(f"{self.what} sample {index} gives non-finite {name} (NaN or inf); refusing the pass "
                             "(check the data, or the model's weights when its images are finite)")


@torch.no_grad()
def confusion_counts(model: nn.Module, batches: Iterable, num_classes: int, device: torch.device,
                     dtype: torch.dtype, autocast: Callable[[], object] = contextlib.nullcontext,
                     what: str = "evaluation set", first_index: int = 0) -> torch.Tensor:
    """(C, C) float64 counts ``[true, predicted]`` on ``device`` of ``model``'s argmax predictions (raw logits) over
    ``batches`` of ``(x, y)`` (moved by :func:`batch_to_device`); the forward runs under ``autocast()``. Labels,
    images and logits are checked (:class:`SampleChecks`; errors name ``what`` and the sample's index, counted from
    ``first_index``)."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    checks = SampleChecks(what, num_classes, first_index)
    with eval_mode(model):
        for batch in batches:
            checks.arrived(batch)
            x, y = batch_to_device(batch, device, dtype)
            with autocast():
                logits = model(x)
            checks.computed(images=x, logits=logits)
            cm.view(-1).index_add_(0, y * num_classes + logits.argmax(dim=-1), torch.ones_like(y, dtype=torch.float64))
    checks.raise_if_nonfinite()
    return cm


@torch.no_grad()
def class_feature_sums(model: nn.Module, head: nn.Module, batches: Iterable, num_classes: int, device: torch.device,
                       dtype: torch.dtype, autocast: Callable[[], object] = contextlib.nullcontext,
                       what: str = "head_init_set", first_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums (C, D) float64 of the features entering ``head`` (D = ``head.in_features``) and the class
    counts (C,) float64, on ``device``, over ``batches`` of ``(x, y)`` (moved by :func:`batch_to_device`), forwards
    in eval mode under ``autocast()``. Labels, images and features are checked (:class:`SampleChecks`; errors name
    ``what`` and the sample's index, counted from ``first_index``)."""
    captured = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    sums = torch.zeros(num_classes, head.in_features, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    checks = SampleChecks(what, num_classes, first_index)
    try:
        with eval_mode(model):
            for batch in batches:
                checks.arrived(batch)
                x, y = batch_to_device(batch, device, dtype)
                captured.clear()
                with autocast():
                    model(x)
                features = captured[-1].reshape(len(y), -1)
                checks.computed(images=x, features=features)
                sums.index_add_(0, y, features.double())
                counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    finally:
        hook.remove()
    checks.raise_if_nonfinite()
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
