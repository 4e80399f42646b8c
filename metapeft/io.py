"""Save and load an injected model's adapter (safetensors + config metadata) and export it as an HF PEFT LoRA."""

from __future__ import annotations

import copy
import json
import os
import re
import uuid
from itertools import chain

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from metapeft.inject import (
    CONFIG_ATTRIBUTE,
    InjectionConfig,
    inject,
    injection_config,
    peft_modules,
    replace_module,
    unwrap_compiled,
)
from metapeft.layers import FusedMetaLoRA

FORMAT = "metapeft-adapter/1"


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, by qualified name: every placed module's PEFT weights and modulator
    (a parameter, or a buffer when ``meta=False``) and the state of ``modules_to_save`` (the head)."""
    config = injection_config(model)
    model = unwrap_compiled(model)
    tensors = {}
    for placement in config.placements:
        module = model.get_submodule(placement.module)
        wanted = {id(t) for t in module.peft_parameters()} | {id(module.modulator)}
        for key, tensor in chain(module.named_parameters(), module.named_buffers()):
            if id(tensor) in wanted:
                tensors[f"{placement.module}.{key}"] = tensor
    for name in config.modules_to_save:
        for key, tensor in model.get_submodule(name).state_dict(keep_vars=True).items():
            tensors[f"{name}.{key}"] = tensor
    return tensors


def _check_unmerged(model: nn.Module, action: str) -> None:
    merged = [name for name, m in peft_modules(model) if getattr(m, "merged", False)]
    if merged:
        raise RuntimeError(f"cannot {action} while LoRA weights are merged ({merged[0]}, ...); "
                           "call metapeft.unmerge(model) first")


def save_adapter(model: nn.Module, path: str | os.PathLike) -> str:
    """Write ``adapter_tensors(model)`` to a safetensors file with the injection config in its metadata.

    The file is written to a temporary name beside ``path``, flushed to disk and moved over ``path`` with
    ``os.replace``: a crash leaves either the old file or the new one, never a torn one. Returns the path.
    """
    config = injection_config(model)
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in adapter_tensors(model).items()}
    metadata = {"format": "pt", "metapeft_format": FORMAT, "metapeft_config": json.dumps(config.to_dict())}
    path = os.fspath(path)
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def read_adapter_config(path: str | os.PathLike) -> InjectionConfig:
    """The :class:`InjectionConfig` stored in an adapter file's metadata."""
    with safe_open(os.fspath(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("metapeft_format") != FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a metapeft adapter file (metadata format "
                         f"{metadata.get('metapeft_format')!r}, expected {FORMAT!r})")
    return InjectionConfig.from_dict(json.loads(metadata["metapeft_config"]))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> InjectionConfig:
    """Load a :func:`save_adapter` file into ``model``.

    An injected model must carry the same injection (method, positions, layers, rank, alpha, placements, head,
    ...; dropout, init_gamma and backend may differ) and every tensor must match in name and shape, else a
    ``ValueError`` lists the differences and nothing is loaded. A model without metapeft modules is first
    injected with the file's config (should a later check fail, it stays injected, freshly initialised).
    Returns the model's config.
    """
    file_config = read_adapter_config(path)
    target = unwrap_compiled(model)
    model_config = getattr(target, CONFIG_ATTRIBUTE, None)
    if model_config is None:
        inject(target, **file_config.inject_kwargs())
        model_config = injection_config(target)
    differences = model_config.structural_differences(file_config)
    if differences:
        raise ValueError(f"adapter file {os.fspath(path)} was saved from a different injection (model != file): "
                         + "; ".join(differences))
    _check_unmerged(target, "load an adapter")
    expected = adapter_tensors(target)
    with safe_open(os.fspath(path), framework="pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    problems = [f"missing {k}" for k in sorted(expected.keys() - stored.keys())]
    problems += [f"unexpected {k}" for k in sorted(stored.keys() - expected.keys())]
    problems += [f"{k}: file shape {tuple(stored[k].shape)} != model shape {tuple(t.shape)}"
                 for k, t in expected.items() if k in stored and stored[k].shape != t.shape]
    if problems:
        raise ValueError(f"adapter file {os.fspath(path)} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(stored[key])
    return model_config


def peft_lora_factors(module: FusedMetaLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain LoRA equal to ``module``'s scaled segments, scale folded into B: ``(A (S_a*r, K),
    B (N, S_a*r))`` in float32 or wider, with ``B A = cat_j(scale_j * B_j A_j)`` (B block-diagonal over the
    S_a active segments, zero rows for inactive segments); ``S_a * r`` is the PEFT rank."""
    compute = torch.promote_types(module.lora_A.dtype, torch.float32)
    lora_A, lora_B = module.lora_A.detach().to(compute), module.lora_B.detach().to(compute)
    scale = module.scale().detach().to(compute)
    rank, per_segment = module.rank, module.out_features // module.segments
    folded = lora_B.new_zeros(module.out_features, lora_A.shape[0])
    for i, j in enumerate(module.active_segments):
        rows, columns = slice(j * per_segment, (j + 1) * per_segment), slice(i * rank, (i + 1) * rank)
        folded[rows, columns] = scale[j] * lora_B[i * per_segment:(i + 1) * per_segment]
    return lora_A, folded


def export_peft(model: nn.Module, directory: str | os.PathLike) -> str:
    """Write an HF PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``peft.PeftModel.from_pretrained(<the same base model>, directory)`` loads to reproduce ``model``'s outputs.

    gamma * alpha / r is folded into B and each module's ``lora_alpha`` equals its rank (PEFT scaling 1); a fused
    qkv with S_a LoRA segments becomes one PEFT LoRA of rank S_a * r (``rank_pattern``) with A stacked and B
    block-diagonal. ``modules_to_save`` (the head) is exported too. LoRA only: PEFT has no AdaptFormer or
    Houlsby adapter of this form. Needs ``peft``. Returns the directory.
    """
    config = injection_config(model)
    if config.method != "lora":
        raise ValueError(f"export_peft exports LoRA; this model was injected with method={config.method!r}")
    source = unwrap_compiled(model)
    _check_unmerged(source, "export")
    from peft import LoraConfig, get_peft_model

    names = [p.module for p in config.placements]
    skeleton = copy.deepcopy(source)
    delattr(skeleton, CONFIG_ATTRIBUTE)
    for name in names:
        replace_module(skeleton, name, skeleton.get_submodule(name).base)
    factors = {name: peft_lora_factors(source.get_submodule(name)) for name in names}
    other_ranks = {re.escape(name): a.shape[0] for name, (a, _) in factors.items() if a.shape[0] != config.rank}
    lora_config = LoraConfig(
        r=config.rank, lora_alpha=config.rank, rank_pattern=other_ranks, alpha_pattern=dict(other_ranks),
        target_modules=names, lora_dropout=config.dropout, bias="none",
        modules_to_save=list(config.modules_to_save) or None,
    )
    peft_model = get_peft_model(skeleton, lora_config)
    with torch.no_grad():
        for name, (lora_A, lora_B) in factors.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(lora_A)
            layer.lora_B["default"].weight.copy_(lora_B)
    directory = os.fspath(directory)
    peft_model.save_pretrained(directory)
    return directory
