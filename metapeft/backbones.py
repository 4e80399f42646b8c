"""Pre-trained backbone checkpoints in layouts other than timm's: SatMAE's MAE pre-training checkpoints.

SatMAE (Cong et al., NeurIPS 2022) releases its ViT-L/16 pre-training checkpoints (e.g. ``fmow_pretrain.pth``) as a
``torch.save`` dict whose ``model`` entry is the masked autoencoder's state dict. Its encoder keys are timm's
``VisionTransformer`` keys (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.<i>.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}.*``, ``norm.*``); what differs:

- the decoder (``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks.*``, ``decoder_norm``, ``decoder_pred``)
  and ``mask_token`` exist only for pre-training: they are dropped;
- the final ``norm.*`` becomes ``fc_norm.*`` in a timm model that pools by averaging (``global_pool="avg"``, where
  timm's ``norm`` is an identity);
- ``pos_embed`` holds the pre-training grid (14 x 14 + class token at 224 px); a model built for another image size
  gets it resampled (bicubic, timm's ``resample_abs_pos_embed``), a different width is an error;
- there is no classifier head: the model's head stays as built (trained from scratch);
- its inputs were normalised with fMoW-RGB's statistics (:data:`SATMAE_MEAN`, :data:`SATMAE_STD`), not ImageNet's;
- the file may also hold ``optimizer``, ``epoch``, ``scaler`` and ``args`` (an ``argparse.Namespace``): the load
  uses ``torch.load(weights_only=True)`` with ``argparse.Namespace`` as the only extra allowed type, so no pickled
  code runs.

Every other missing or unexpected key is an error that names it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from metapeft.atomic_files import read_torch_file
from metapeft.heads import find_head

SATMAE_PRETRAINING_ONLY = ("decoder_", "mask_token")
# Per-channel RGB mean / std of fMoW-RGB, the normalisation SatMAE's pre-training data loader applies: inputs of a
# SatMAE encoder are normalised the same way.
SATMAE_MEAN = (0.4182007312774658, 0.4214799106121063, 0.3991275727748871)
SATMAE_STD = (0.28774282336235046, 0.27541765570640564, 0.2764017581939697)


def read_satmae_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a SatMAE pre-training checkpoint file: its ``model`` entry (or the file itself when it is a
    plain state dict). ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing, unreadable or
    holds no tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SatMAE checkpoint {path}: no such file")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = read_torch_file(path)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"SatMAE checkpoint {path}: expected a 'model' state dict of tensors")
    return dict(state)


def satmae_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """SatMAE encoder tensors renamed and reshaped for the timm ViT ``model`` (module docstring): decoder and
    ``mask_token`` dropped, ``norm`` -> ``fc_norm`` for an average-pooling model, ``pos_embed`` resampled to the
    model's grid. ``ValueError`` naming every unexpected key, every missing non-head key and every shape that
    does not fit."""
    from timm.layers import resample_abs_pos_embed

    own = model.state_dict()
    renamed = "norm.weight" not in own and "fc_norm.weight" in own
    converted = {}
    for key, tensor in state.items():
        if key.startswith(SATMAE_PRETRAINING_ONLY):
            continue
        if renamed and key.startswith("norm."):
            key = "fc_norm." + key.removeprefix("norm.")
        if key == "pos_embed" and tensor.shape != own[key].shape and tensor.shape[-1] == own[key].shape[-1]:
            tensor = resample_abs_pos_embed(tensor, new_size=list(model.patch_embed.grid_size),
                                            num_prefix_tokens=model.num_prefix_tokens)
        converted[key] = tensor
    head_prefix = find_head(model) + "."
    unexpected = sorted(set(converted) - set(own))
    missing = sorted(k for k in set(own) - set(converted) if not k.startswith(head_prefix))
    wrong_shape = sorted(f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
                         for k, v in converted.items() if k in own and v.shape != own[k].shape)
    if unexpected or missing or wrong_shape:
        problems = [f"{what} {names}" for what, names in (("unexpected keys", unexpected), ("missing keys", missing),
                                                          ("other shapes", wrong_shape)) if names]
        raise ValueError(f"the SatMAE checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    return converted


def load_satmae_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load SatMAE's pre-training checkpoint ``path`` (e.g. ``fmow_pretrain.pth``, ViT-L/16) into the timm ViT
    ``model`` (e.g. ``timm.create_model("vit_large_patch16_224", num_classes=C)``) in place; the classifier head
    keeps its initialisation. Errors as :func:`read_satmae_checkpoint` and :func:`satmae_to_timm`, naming the
    file. Returns ``model``."""
    state = read_satmae_checkpoint(path)
    try:
        converted = satmae_to_timm(state, model)
    except ValueError as error:
        raise ValueError(f"SatMAE checkpoint {path}: {error}") from None
    model.load_state_dict(converted, strict=False)
    return model
