"""Putting a model in place for training: the device, bf16 autocast, the classifier head and which parameters
train."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from metapeft.heads import CosineClassifier, find_head, head_in_features, replace_head
from metapeft.inject import unwrap_model
from metapeft.params import mark_only_peft_trainable, meta_parameters
from metapeft.trainer.config import TrainerConfig


def resolve_device(name: str) -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; any other name as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA (``amp="auto"`` or ``"bf16"``), on CPU only with ``amp="bf16"``; else a no-op."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_forward(model: nn.Module) -> nn.Module:
    """The module the trainer's forward passes run: ``model`` without ``DistributedDataParallel`` /
    ``DataParallel`` wrappers (the trainer all-reduces gradients itself, and DDP's hooks do not fire under
    ``torch.autograd.grad``); a ``torch.compile`` wrapper is kept unless a DDP wrapper sits inside it."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return unwrap_model(model)
    return model


def parameter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.float32 if reference is None else reference.dtype


def head_to_replace(model: nn.Module, config: TrainerConfig, num_classes: int) -> str | None:
    """The head's module name when :func:`install_head` would replace it (``classifier="cosine"`` without a
    :class:`~metapeft.heads.CosineClassifier` of ``num_classes`` classes, or a head of another width), else None."""
    name = find_head(model, config.head)
    old = model.get_submodule(name)
    if config.classifier == "cosine":
        return None if isinstance(old, CosineClassifier) and old.num_classes == num_classes else name
    return None if getattr(old, "out_features", None) == num_classes else name


def install_head(model: nn.Module, config: TrainerConfig, num_classes: int) -> str:
    """Give ``model`` the configured classifier head for ``num_classes`` classes and return the head's module name:
    a :class:`~metapeft.heads.CosineClassifier` (``classifier="cosine"``, unless one of that size is already in
    place) or the existing head, replaced by a fresh ``nn.Linear`` when its width differs."""
    name = find_head(model, config.head)
    if head_to_replace(model, config, num_classes) is None:
        return name
    old, dtype = model.get_submodule(name), parameter_dtype(model)
    if config.classifier == "cosine":
        head = CosineClassifier(head_in_features(model, old), num_classes, config.cosine_scale)
    else:
        head = nn.Linear(head_in_features(model, old), num_classes)
    replace_head(model, name, head.to(dtype=dtype))
    return name


def select_trainable(model: nn.Module, head: nn.Module, config: TrainerConfig) -> list[nn.Parameter]:
    """Freeze the backbone (``freeze_backbone``: all but PEFT weights, modulators and ``head``) and the modulators
    (``meta=False``); returns the modulators rho that the outer loop trains (empty without meta-learning)."""
    if config.freeze_backbone:
        mark_only_peft_trainable(model, extra=(head,))
    if not config.meta:
        for p in meta_parameters(model):
            p.requires_grad_(False)
        return []
    return meta_parameters(model)
