"""A tiny timm ViT, random PEFT weights for it, and images of its size."""

import timm
import torch
from torch import nn

from metapeft.inject import peft_modules


def tiny_vit(seed: int = 1, depth: int = 3, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """A small timm ViT (dim 48, 3 heads, 32x32 images in 8x8 patches, 5 classes), same weights per seed."""
    torch.manual_seed(seed)
    options = dict(pretrained=False, img_size=32, patch_size=8, depth=depth, num_classes=5, embed_dim=48,
                   num_heads=3)
    return timm.create_model("vit_tiny_patch16_224", **{**options, **kwargs}).to(dtype)


def randomize(model: nn.Module) -> None:
    """Nonzero LoRA B, random modulators and head: every injected module and the head change the logits."""
    with torch.no_grad():
        for _, module in peft_modules(model):
            for p in module.peft_parameters():
                p.normal_(0, 0.2)
            module.modulator.uniform_(-1.0, 2.0)
        model.get_classifier().weight.normal_(0, 0.2)


def images(batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, dtype=dtype)
