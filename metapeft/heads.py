"""The cosine classifier head (scale 25), its class-mean initialisation and head replacement in a model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_NAMES = ("head", "fc", "classifier")


class CosineClassifier(nn.Module):
    """``logits = scale * normalize(f) @ normalize(W)^T``: cosine similarity to per-class prototypes.

    Args:
        in_features: D, the feature width.
        num_classes: C.
        scale: the logit scale s (25 in the paper's recipe; a fixed constant, not learned).
    Parameter ``weight`` (C, D). Input ``features`` (..., D) -> logits (..., C).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 25.0) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        self.in_features, self.num_classes, self.scale = in_features, num_classes, float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=in_features**-0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))

    @torch.no_grad()
    def init_from_class_means(self, feature_sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Set each class prototype to its mean feature direction; classes with no sample keep their init.

        feature_sums: (C, D) per-class sums of features; counts: (C,) samples per class.
        """
        if feature_sums.shape != self.weight.shape or counts.shape != (self.num_classes,):
            raise ValueError(f"feature_sums must be {tuple(self.weight.shape)} and counts ({self.num_classes},), "
                             f"got {tuple(feature_sums.shape)} and {tuple(counts.shape)}")
        present = counts > 0
        means = feature_sums[present] / counts[present].unsqueeze(1).to(feature_sums.dtype)
        self.weight[present] = F.normalize(means, dim=-1).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, scale={self.scale}"


def find_head(model: nn.Module, name: str | None = None) -> str:
    """The dotted name of ``model``'s classifier module: ``name`` if given, else timm's ``get_classifier()``,
    else the first of the attributes ``head``, ``fc``, ``classifier`` that is a module."""
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules or name == "":
            raise ValueError(f"head {name!r} is not a submodule of the model")
        return name
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        for module_name, module in modules.items():
            if module is classifier and module_name:
                return module_name
    for candidate in HEAD_NAMES:
        if isinstance(getattr(model, candidate, None), nn.Module):
            return candidate
    raise ValueError(f"cannot find the model's classifier head (tried get_classifier() and {HEAD_NAMES}); "
                     "pass its module name as head=")


def head_in_features(model: nn.Module, head: nn.Module) -> int:
    """Feature width D entering ``head``: its ``in_features``, else the model's ``num_features`` (timm)."""
    width = getattr(head, "in_features", None) or getattr(model, "num_features", None)
    if not isinstance(width, int):
        raise ValueError(f"cannot tell the feature width of head {type(head).__name__}: it has no in_features "
                         "and the model no num_features")
    return width


def replace_head(model: nn.Module, name: str, new_head: nn.Module) -> nn.Module:
    """Put ``new_head`` at dotted module path ``name`` in ``model``; returns ``new_head``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_head)
    return new_head
