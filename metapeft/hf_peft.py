"""HF PEFT interop, both ways: :func:`from_peft` turns a PEFT LoRA model into a metapeft model (its ``lora.Linear``
layers become :class:`~metapeft.FusedMetaLoRA` with the same weights and scale, gamma starting at 1), and
:func:`export_peft` writes an injected metapeft LoRA model as a PEFT adapter directory (gamma folded in).

Needs the optional ``peft`` package (``pip install "metapeft[peft]"``); without it both functions raise an
``ImportError`` naming that extra.
"""

from __future__ import annotations

import copy
import os
import re
from collections import Counter

import torch
from torch import nn

from metapeft.adapter_files import check_unmerged
from metapeft.atomic_files import nonfinite_tensors
from metapeft.heads import CosineClassifier
from metapeft.inject import CONFIG_ATTRIBUTE, Injection, Placement, injection_config, replace_module, unwrap_model
from metapeft.layers import FusedMetaLoRA, MetaPEFTModule
from metapeft.params import mark_only_peft_trainable

PEFT_EXTRA = 'pip install "metapeft[peft]"'


def require_peft():
    """The ``peft`` module; an ``ImportError`` naming the ``peft`` extra when it is not installed."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"HF PEFT interop needs the peft package: {PEFT_EXTRA} (or pip install peft)") from error
    return peft


# ----- import ---------------------------------------------------------------------------------------------------
def _unwrap_peft(model: nn.Module, peft) -> nn.Module:
    """The model under a ``PeftModel`` / ``LoraModel`` wrapper (or ``model`` itself)."""
    if isinstance(model, peft.PeftModel):
        model = model.base_model
    if isinstance(model, peft.tuners.lora.LoraModel):
        model = model.model
    return model


def _active_adapter(layer, name: str) -> str:
    """The one adapter active in a PEFT layer; a ``ValueError`` naming the layer otherwise."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if layer.disable_adapters or len(active) != 1:
        raise ValueError(f"from_peft: {name!r} has active LoRA adapters {active} (adapters disabled: "
                         f"{layer.disable_adapters}); activate exactly one (peft_model.set_adapter(name))")
    return active[0]


def _fused_from_peft_linear(layer, name: str, meta: bool, backend: str) -> FusedMetaLoRA:
    """A ``FusedMetaLoRA`` on ``layer``'s base Linear with its active adapter's A, B and dropout and
    ``alpha = scaling * r``, so the scale ``gamma * alpha / r`` equals PEFT's ``scaling`` at gamma 1."""
    adapter = _active_adapter(layer, name)
    base, lora_A, lora_B = layer.get_base_layer(), layer.lora_A[adapter], layer.lora_B[adapter]
    refused = [what for what, bad in (
        ("merged weights (peft_model.unmerge_adapter() first)", bool(layer.merged_adapters)),
        ("a LoRA variant such as DoRA", adapter in getattr(layer, "lora_variant", {})),
        ("a bias on lora_B (lora_bias=True)", lora_B.bias is not None),
        ("fan_in_fan_out (a transposed Conv1D base)", getattr(layer, "fan_in_fan_out", False)),
        (f"a {type(base).__name__} base layer, not nn.Linear", type(base) is not nn.Linear),
    ) if bad]
    if refused:
        raise ValueError(f"from_peft: {name!r} has {', '.join(refused)}, which FusedMetaLoRA does not represent")
    rank, scaling = layer.r[adapter], float(layer.scaling[adapter])
    dropout = layer.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    fused = FusedMetaLoRA(base, rank=rank, alpha=scaling * rank, dropout=p, init_gamma=1.0, backend=backend,
                          meta=meta)
    with torch.no_grad():
        fused.lora_A.copy_(lora_A.weight)
        fused.lora_B.copy_(lora_B.weight)
    return fused


def _saved_module(wrapper, name: str) -> nn.Module:
    """The module a ``ModulesToSaveWrapper`` runs: its active trained copy, or the original when disabled."""
    active = [a for a in wrapper.active_adapters if a in wrapper.modules_to_save]
    if wrapper.disable_adapters or not active:
        return wrapper.original_module
    if len(active) != 1:
        raise ValueError(f"from_peft: modules_to_save {name!r} has several active adapters {active}")
    return wrapper.modules_to_save[active[0]]


def from_peft(model: nn.Module, adapter_dir: str | os.PathLike | None = None, *, meta: bool = True,
              backend: str = "auto") -> nn.Module:
    """A metapeft model from an HF PEFT LoRA model: every PEFT ``lora.Linear`` becomes a
    :class:`~metapeft.FusedMetaLoRA` on the same frozen Linear with the same A, B, dropout and scale
    (``alpha = scaling * r``, gamma 1: ``gamma * alpha / r`` equals PEFT's ``scaling``, rsLoRA included), and every
    ``modules_to_save`` wrapper becomes its trained module. The logits are unchanged; MetaPEFT then learns gamma.

    ``model``: a ``peft.PeftModel`` (or ``LoraModel``, or a model holding PEFT LoRA layers); with ``adapter_dir``,
    a base model and a PEFT adapter directory to load into it first (``PeftModel.from_pretrained``). Changes the
    underlying model in place (do not use the PEFT wrapper afterwards) and returns it, injected as by
    :func:`metapeft.inject` with ``target_modules`` = the converted layers' names: everything frozen but the LoRA
    weights, modulators and saved modules; ``meta=False`` keeps the scale fixed (plain LoRA). Refused with a
    ``ValueError`` naming the layer, before anything changes: merged adapters, DoRA or other LoRA variants, a LoRA
    bias, Conv1D / Embedding / Conv LoRA layers, several active adapters, a model without LoRA layers.

    :func:`metapeft.save_adapter` / :func:`export_peft` work on the result; loading its adapter file into a fresh
    base model (:func:`metapeft.load_adapter`) needs one rank and one scale across the layers (no ``rank_pattern``
    / ``alpha_pattern``), since the file's injection records one of each.
    """
    peft = require_peft()
    if adapter_dir is not None:
        if isinstance(model, peft.PeftModel):
            raise ValueError("from_peft(model, adapter_dir): model must be the base model, not a PeftModel")
        model = peft.PeftModel.from_pretrained(model, os.fspath(adapter_dir))
    target = unwrap_model(_unwrap_peft(unwrap_model(model), peft))
    if getattr(target, CONFIG_ATTRIBUTE, None) is not None or any(isinstance(m, MetaPEFTModule)
                                                                    for m in target.modules()):
        raise ValueError("from_peft: model already holds metapeft modules")
    lora_type, wrapper_type = peft.tuners.lora.LoraLayer, peft.utils.other.ModulesToSaveWrapper
    layers = [(name, m) for name, m in target.named_modules() if isinstance(m, lora_type)]
    others = [f"{name} ({type(m).__name__})" for name, m in layers if not isinstance(m, peft.tuners.lora.Linear)]
    if others:
        raise ValueError(f"from_peft: only PEFT LoRA Linear layers convert; found {others[:3]}")
    if not layers:
        raise ValueError(f"from_peft: {type(target).__name__} holds no PEFT LoRA layers")
    fused = {name: _fused_from_peft_linear(layer, name, meta, backend) for name, layer in layers}
    saved = {name: _saved_module(m, name) for name, m in target.named_modules() if isinstance(m, wrapper_type)}
    for name, module in [*fused.items(), *saved.items()]:  # planned and checked above: now change the model
        replace_module(target, name, module)
    if hasattr(target, "peft_config"):
        del target.peft_config  # PEFT's bookkeeping on the base model, meaningless once its layers are gone
    mark_only_peft_trainable(target, extra=tuple(saved.values()))
    ranks = Counter(m.rank for m in fused.values())
    alphas = Counter(m.alpha for m in fused.values())
    names = tuple(fused)
    record = Injection(method="lora", target_modules=names, rank=ranks.most_common(1)[0][0],
                       alpha=alphas.most_common(1)[0][0], dropout=max(m.dropout for m in fused.values()), meta=meta,
                       backend=backend, modules_to_save=tuple(saved), rows=names, columns=("gamma",),
                       placements=tuple(Placement(name, name, ("gamma",)) for name in names))
    setattr(target, CONFIG_ATTRIBUTE, record)
    return target


# ----- export ---------------------------------------------------------------------------------------------------
def peft_lora_factors(module: FusedMetaLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain LoRA equal to ``module``'s scaled segments, scale folded into B: ``(A (S_a*r, K),
    B (N, S_a*r))`` in float32 or wider, with ``B A = cat_j(diag(scale) B_j A_j)`` (B block-diagonal over the
    S_a active segments, zero rows for inactive segments, each row times its output's scale: one per segment, or
    one per output channel with ``gamma="channel"``); ``S_a * r`` is the PEFT rank."""
    compute = torch.promote_types(module.lora_A.dtype, torch.float32)
    lora_A, lora_B = module.lora_A.detach().to(compute), module.lora_B.detach().to(compute)
    scale = module.output_scale().detach().to(compute).unsqueeze(1)  # (N, 1)
    rank, per_segment = module.rank, module.out_features // module.segments
    folded = lora_B.new_zeros(module.out_features, lora_A.shape[0])
    for i, j in enumerate(module.active_segments):
        rows, columns = slice(j * per_segment, (j + 1) * per_segment), slice(i * rank, (i + 1) * rank)
        folded[rows, columns] = scale[rows] * lora_B[i * per_segment:(i + 1) * per_segment]
    return lora_A, folded


def export_peft(model: nn.Module, directory: str | os.PathLike) -> str:
    """Write an HF PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``peft.PeftModel.from_pretrained(<the same base model>, directory)`` loads to reproduce ``model``'s outputs.

    gamma * alpha / r is folded into B's rows (per segment, or per output channel with ``gamma="channel"``: PEFT has
    one scaling per module, B's rows carry the rest) and each module's ``lora_alpha`` equals its rank (PEFT scaling 1);
    a fused qkv with S_a LoRA segments becomes one PEFT LoRA of rank S_a * r (``rank_pattern``) with A stacked and B
    block-diagonal. ``modules_to_save`` (the head) is exported too and loads into a base model whose head has the
    same type and size. Refused with a ``ValueError`` naming the part PEFT cannot represent: AdaptFormer and Houlsby
    adapters (PEFT has none of this form) and a :class:`~metapeft.heads.CosineClassifier` head (the trainer's
    default; PEFT restores a saved module into the base model's own ``nn.Linear``); also refused: non-finite
    weights or gamma. Needs ``peft`` (the ``peft`` extra). Returns the directory.
    """
    config = injection_config(model)
    if config.method != "lora":
        raise ValueError(f"export_peft exports LoRA; this model was injected with method={config.method!r}")
    source = unwrap_model(model)
    check_unmerged(source, "export")
    for name in config.modules_to_save:
        head = source.get_submodule(name)
        if isinstance(head, CosineClassifier):
            raise ValueError(
                f"export_peft: modules_to_save {name!r} is a metapeft CosineClassifier (logits = {head.scale:g} * "
                "cos(features, W)), which HF PEFT cannot represent: PEFT puts a saved module back into the base "
                "model's own module of that name (an nn.Linear on a timm model), so the logits would differ. Keep "
                "the metapeft adapter (metapeft.save_adapter / load_adapter), or train with classifier='linear' to "
                "export to PEFT")
    peft = require_peft()
    names = [p.module for p in config.placements]
    factors = {name: peft_lora_factors(source.get_submodule(name)) for name in names}
    bad = nonfinite_tensors(factors)
    if bad:
        raise ValueError(f"export_peft: non-finite LoRA weights or gamma in {bad[:5]}")
    skeleton = copy.deepcopy(source)
    delattr(skeleton, CONFIG_ATTRIBUTE)
    for name in names:
        replace_module(skeleton, name, skeleton.get_submodule(name).base)
    other_ranks = {re.escape(name): a.shape[0] for name, (a, _) in factors.items() if a.shape[0] != config.rank}
    lora_config = peft.LoraConfig(
        r=config.rank, lora_alpha=config.rank, rank_pattern=other_ranks, alpha_pattern=dict(other_ranks),
        target_modules=names, lora_dropout=config.dropout, bias="none",
        modules_to_save=list(config.modules_to_save) or None,
    )
    peft_model = peft.get_peft_model(skeleton, lora_config)
    with torch.no_grad():
        for name, (lora_A, lora_B) in factors.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(lora_A)
            layer.lora_B["default"].weight.copy_(lora_B)
    directory = os.fspath(directory)
    peft_model.save_pretrained(directory)
    return directory
