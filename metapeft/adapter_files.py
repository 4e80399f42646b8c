"""Save and load an injected model's adapter (a self-describing, checksummed safetensors file). HF PEFT export and
import live in :mod:`metapeft.hf_peft`."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from itertools import chain

import torch
from torch import nn

from metapeft.atomic_files import (
    CHECKSUM_KEY,
    LoadError,
    check_tensors_fit,
    copy_into,
    load_safetensors,
    save_safetensors,
)
from metapeft.heads import CosineClassifier, replace_head
from metapeft.inject import (
    CONFIG_ATTRIBUTE,
    Injection,
    inject,
    injection_config,
    peft_modules,
    unwrap_model,
)

FORMAT = "metapeft-adapter/2"
# Head types load_adapter can rebuild from their description in the file.
REBUILDABLE_HEADS = ("CosineClassifier", "Linear")


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter file says about itself.

    ``config``: the injection (method, positions, layers, rank, alpha, placements, ...). ``heads``: per module of
    ``modules_to_save``, its type and sizes (``{"type": "CosineClassifier", "in_features", "num_classes",
    "scale"}``, ``{"type": "Linear", "in_features", "out_features", "bias"}``, else only ``type``). ``gamma``: per
    placed module, its gamma values (the modulators after their constraint). ``class_names``: the classes in
    logit order, when the saver knew them. ``versions``: ``metapeft`` and ``torch`` of the saver.
    """

    config: Injection
    heads: dict[str, dict]
    gamma: dict[str, list[float]]
    class_names: tuple[str, ...] | None
    versions: dict[str, str]


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def describe_head(module: nn.Module) -> dict:
    """The type and sizes of a ``modules_to_save`` module, as stored in an adapter file (:class:`AdapterInfo`)."""
    if isinstance(module, CosineClassifier):
        return {"type": "CosineClassifier", "in_features": module.in_features, "num_classes": module.num_classes,
                "scale": module.scale}
    if type(module) is nn.Linear:
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    return {"type": type(module).__name__}


def _build_head(description: dict, like: nn.Module) -> nn.Module:
    """A fresh module of ``description`` on the device and in the dtype of ``like``'s first tensor."""
    reference = next(chain(like.parameters(), like.buffers()), None)
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    if description["type"] == "CosineClassifier":
        head = CosineClassifier(description["in_features"], description["num_classes"], description["scale"])
        return head.to(**factory)
    return nn.Linear(description["in_features"], description["out_features"], bias=description["bias"], **factory)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, by qualified name: every placed module's PEFT weights and modulator
    (a parameter, or a buffer when ``meta=False``) and the state of ``modules_to_save`` (the head)."""
    config = injection_config(model)
    model = unwrap_model(model)
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


def check_unmerged(model: nn.Module, action: str) -> None:
    merged = [name for name, m in peft_modules(model) if getattr(m, "merged", False)]
    if merged:
        raise RuntimeError(f"cannot {action} while LoRA weights are merged ({merged[0]}, ...); "
                           "call metapeft.unmerge(model) first")


def save_adapter(model: nn.Module, path: str | os.PathLike, class_names: list[str] | None = None) -> str:
    """Write ``adapter_tensors(model)`` to a self-describing safetensors file: its metadata holds the injection
    config, each head's type and sizes, gamma per module, ``class_names`` (if given, one per logit), the metapeft
    and torch versions and a sha256 of the content (:class:`AdapterInfo`).

    ``model`` may be wrapped by ``torch.compile`` or DDP. The write is atomic (a crash leaves the old file or the
    new one) and refuses non-finite tensors. Returns the path.
    """
    config = injection_config(model)
    target = unwrap_model(model)
    check_unmerged(target, "save an adapter")
    heads = {name: describe_head(target.get_submodule(name)) for name in config.modules_to_save}
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        counts = {name: h.get("num_classes", h.get("out_features")) for name, h in heads.items()}
        wrong = {name: n for name, n in counts.items() if n is not None and n != len(class_names)}
        if wrong:
            raise ValueError(f"class_names has {len(class_names)} names but the head(s) have {wrong} outputs")
    gamma = {p.module: target.get_submodule(p.module).gamma.detach().float().cpu().tolist()
             for p in config.placements}
    metadata = {"format": "pt", "metapeft_format": FORMAT, "metapeft_config": config.to_dict(), "heads": heads,
                "gamma": gamma, "class_names": class_names,
                "versions": {"metapeft": _package_version("metapeft"), "torch": torch.__version__}}
    save_safetensors(adapter_tensors(target), path, metadata)
    return os.fspath(path)


def _info_from_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> AdapterInfo:
    if metadata.get("metapeft_format") != FORMAT:
        raise LoadError(f"{os.fspath(path)}: not a metapeft adapter file of this version (metadata format "
                        f"{metadata.get('metapeft_format')!r}, expected {FORMAT!r})")
    if CHECKSUM_KEY not in metadata:
        raise LoadError(f"{os.fspath(path)}: the adapter's content checksum is missing from its metadata")
    try:
        class_names = json.loads(metadata["class_names"])
        return AdapterInfo(
            config=Injection.from_dict(json.loads(metadata["metapeft_config"])),
            heads=json.loads(metadata["heads"]), gamma=json.loads(metadata["gamma"]),
            class_names=None if class_names is None else tuple(class_names),
            versions=json.loads(metadata["versions"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise LoadError(f"{os.fspath(path)}: unreadable adapter metadata ({type(error).__name__}: {error})") from None


def read_adapter_info(path: str | os.PathLike) -> AdapterInfo:
    """The :class:`AdapterInfo` of an adapter file (the whole file is read and its checksum verified)."""
    return _info_from_metadata(path, load_safetensors(path, require_checksum=False)[1])


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules with every parameter and buffer on the meta device (no memory, no data):
    what an injection and head replacement would produce is planned on it before ``model`` changes."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _prepare(model: nn.Module, info: AdapterInfo, path: str) -> None:
    """Inject ``info.config`` into an uninjected ``model`` and rebuild heads that differ from ``info.heads``;
    a ``LoadError`` naming the file when the injection does not fit the model or differs from the model's, or a
    head cannot be rebuilt."""
    if getattr(model, CONFIG_ATTRIBUTE, None) is None:
        try:
            inject(model, info.config)
        except (TypeError, ValueError) as error:
            raise LoadError(f"adapter file {path} does not fit the model: its injection cannot be applied to it "
                            f"({error})") from None
    differences = injection_config(model).structural_differences(info.config)
    if differences:
        raise LoadError(f"adapter file {path} was saved from a different injection (model != file): "
                        + "; ".join(differences))
    for name, description in info.heads.items():
        current = model.get_submodule(name)
        if describe_head(current) == description:
            continue
        if description["type"] not in REBUILDABLE_HEADS:
            raise LoadError(f"adapter file {path}: module {name!r} is a {description['type']} in the file and a "
                            f"{type(current).__name__} in the model; only {REBUILDABLE_HEADS} heads are rebuilt")
        replace_head(model, name, _build_head(description, current).requires_grad_(True))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> AdapterInfo:
    """Load a :func:`save_adapter` file into ``model`` (which may be wrapped by ``torch.compile`` or DDP).

    All or nothing: the file is read and verified (checksum, finiteness), then the injection and heads the file
    describes are planned on a meta-device copy of the model and every tensor is checked against it (names,
    shapes, dtypes); only then does ``model`` change. An uninjected model is injected with the file's config; an
    injected one must carry the same injection (dropout, init_gamma and backend may differ). A head
    (``modules_to_save``) whose type or size differs from the file's is replaced by the file's (a cosine or linear
    classifier). Errors are :class:`~metapeft.atomic_files.LoadError` naming the file and every problem. Returns the
    file's :class:`AdapterInfo` (class names, gamma, versions, ...).
    """
    path = os.fspath(path)
    stored, metadata = load_safetensors(path, require_checksum=False)
    info = _info_from_metadata(path, metadata)
    target = unwrap_model(model)
    check_unmerged(target, "load an adapter")
    plan = _skeleton(target)
    _prepare(plan, info, path)
    check_tensors_fit(stored, adapter_tensors(plan), f"adapter file {path}")
    _prepare(target, info, path)
    copy_into(adapter_tensors(target), stored)
    return info

