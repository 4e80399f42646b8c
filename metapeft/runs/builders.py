"""Builders from a run config (:mod:`metapeft.runs.config`): the backbone with its pre-trained weights, the PEFT
model and the datasets.

Errors are ordinary exceptions whose message names the key or the file: ``ValueError`` (a bad value or a file that
does not fit), ``FileNotFoundError`` (a missing file), ``ConnectionError`` / ``OSError`` (no way to download the
pre-trained weights).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import nn

from metapeft.atomic_files import load_safetensors, read_torch_file
from metapeft.backbones import SATMAE_MEAN, SATMAE_STD, load_satmae_weights
from metapeft.heads import find_head
from metapeft.inject import InjectionSummary, inject
from metapeft.runs.config import MODEL_KEYS, PEFT_KEYS, section

HUB_HOST = ("huggingface.co", 443)
WEIGHTS_FORMATS = ("timm", "satmae")  # model.weights_format: the key layout of the model.weights file


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (where timm's pretrained weights live) answers a TCP connection."""
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (loaded with ``weights_only=True``;
    a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped). A file that cannot be read, or holds
    non-finite values, is a :class:`~metapeft.atomic_files.LoadError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights {path}: no such file")
    if path.suffix == ".safetensors":
        return load_safetensors(path, require_checksum=False)[0]
    state = read_torch_file(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.weights {path}: expected a state dict of tensors")
    return state


def load_backbone_weights(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load the weights file ``path`` (:func:`load_weights_file`) into the timm model ``model`` (named ``name`` in
    messages); the classifier head's tensors are skipped when missing or shaped differently (another class count),
    any other missing, unexpected or differently shaped tensor is an error."""
    state = load_weights_file(path)
    own = model.state_dict()
    head_prefix = find_head(model) + "."
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    wrong_shape = [f"{k} {tuple(own[k].shape)}" for k in mismatched if not k.startswith(head_prefix)]
    if missing or result.unexpected_keys or wrong_shape:
        raise ValueError(f"model.weights {path} does not fit {name!r}: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}, other shape than the model's {wrong_shape[:5]}")


def build_backbone(model_config: dict, num_classes: int) -> nn.Module:
    """A timm model with ``num_classes`` outputs and pre-trained weights from, in order: ``model.weights`` (a local
    file, :func:`load_backbone_weights`; with ``model.weights_format: satmae`` SatMAE's pre-training checkpoint,
    :func:`metapeft.backbones.load_satmae_weights`, and then required), timm's hub download when
    ``model.pretrained`` is true (the default) and the hub is reachable (or ``HF_HUB_OFFLINE`` is set: timm's local
    cache). ``pretrained: false`` without weights starts from a random initialisation. A clear error says which
    source is missing."""
    import timm

    values = section({"model": model_config}, "model", MODEL_KEYS)
    name = values.get("name")
    if not name:
        raise ValueError("model.name is required (a timm model name, e.g. vit_base_patch16_224)")
    kwargs = dict(values.get("kwargs") or {})
    weights, pretrained = values.get("weights"), bool(values.get("pretrained", True))
    weights_format = values.get("weights_format", "timm")
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"model.weights_format must be one of {WEIGHTS_FORMATS}, got {weights_format!r}")
    if weights_format == "satmae" and weights is None:
        raise ValueError(f"model.weights_format='satmae': {name!r} starts from SatMAE's pre-training checkpoint; "
                         "set model.weights to it (e.g. fmow_pretrain.pth)")
    download = weights is None and pretrained
    if download and not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
        raise ConnectionError(
            f"no pre-trained weights for {name!r}: the Hugging Face hub ({HUB_HOST[0]}) is not reachable for timm's "
            "download and no local file was given; set model.weights to a local file (a .safetensors or torch "
            "state dict of the backbone) or set model.pretrained=false to start from random weights")
    try:
        model = timm.create_model(name, pretrained=download, num_classes=num_classes, **kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"model.name {name!r} is not a timm model ({error})") from None
        if not download:
            raise
        raise OSError(f"timm could not load pre-trained weights for {name!r} ({error}); "
                      "set model.weights to a local file") from None
    except OSError as error:  # network and hub-cache failures of the download
        if not download:
            raise
        raise OSError(f"timm could not download pre-trained weights for {name!r} ({type(error).__name__}: {error}); "
                      "set model.weights to a local file") from None
    if weights_format == "satmae":
        load_satmae_weights(model, weights)
    elif weights is not None:
        load_backbone_weights(model, weights, name)
    return model


def build_model(config: dict, num_classes: int) -> tuple[nn.Module, InjectionSummary]:
    """The backbone (:func:`build_backbone`) with :func:`metapeft.inject` applied from the ``peft`` section; random
    initialisations (backbone without weights, PEFT weights) are drawn from ``model.seed`` (default 0) without
    touching the global RNG. Returns ``(model, InjectionSummary)``."""
    peft = section(config, "peft", PEFT_KEYS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int((config.get("model") or {}).get("seed", 0)))
        model = build_backbone(config.get("model") or {}, num_classes)
        try:
            summary = inject(model, **peft)
        except (TypeError, ValueError) as error:
            raise ValueError(f"peft section: {error}") from None
    return model, summary


def build_data(config: dict, base_dir: str | os.PathLike):
    """:func:`metapeft.data.build_datasets` of the ``data`` section, normalised with the mean / std the ``model``
    section's backbone was pre-trained with (timm's, or SatMAE's for ``weights_format: satmae``); relative paths
    resolve against ``base_dir``."""
    from metapeft.data import backbone_normalization, build_datasets

    model = config.get("model") or {}
    if model.get("weights_format") == "satmae":
        mean, std = SATMAE_MEAN, SATMAE_STD
    else:
        mean, std = backbone_normalization(model.get("name"))
    return build_datasets(dict(config.get("data") or {}), mean, std, base_dir)
