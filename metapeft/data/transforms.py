"""The paper's image transforms: train = RandomResizedCrop + horizontal flip, test = Resize + CenterCrop (256 -> 224
at the default size), both normalised with the backbone's mean / std."""

from __future__ import annotations

from torch import nn
from torchvision import transforms as T

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def backbone_normalization(model: nn.Module | str | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per RGB channel the backbone was pre-trained with, from timm's pretrained config of ``model``
    (a timm model, or a timm model name such as ``"vit_base_patch16_clip_224.openai"``); ImageNet's when there is
    none (an unknown name, a non-timm model, None)."""
    if isinstance(model, str):
        import timm

        config = timm.get_pretrained_cfg(model)
        config = {} if config is None else {"mean": config.mean, "std": config.std}
    else:
        config = getattr(model, "pretrained_cfg", None) or {}
    mean, std = config.get("mean") or IMAGENET_MEAN, config.get("std") or IMAGENET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def build_transforms(train: bool, image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     resize: int | None = None) -> T.Compose:
    """A ``PIL.Image`` -> float32 tensor (3, image_size, image_size) pipeline.

    train: ``RandomResizedCrop(image_size)`` + ``RandomHorizontalFlip()``; test: ``Resize(resize)`` (the short side;
    default ``round(image_size * 256 / 224)``) + ``CenterCrop(image_size)``. Then ``ToTensor`` and ``Normalize``.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std must have 3 entries (RGB) with std > 0, got {mean}, {std}")
    resize = round(image_size * 256 / 224) if resize is None else resize
    if resize < image_size:
        raise ValueError(f"resize ({resize}) must be >= image_size ({image_size})")
    if train:
        geometry = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(resize), T.CenterCrop(image_size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])
