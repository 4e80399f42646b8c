"""Put metapeft modules into a model: timm Vision Transformers by (layer, position), any model by Linear name.

On a timm ``VisionTransformer`` (``model.blocks[i]`` with ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``):

| method | positions | what is placed |
|---|---|---|
| ``"lora"`` | ``q``, ``k``, ``v`` | one ``FusedMetaLoRA(attn.qkv, segments=3)`` per block, only the asked segments |
| ``"lora"`` | ``out``, ``mlp1``, ``mlp2`` | ``FusedMetaLoRA`` on ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` |
| ``"adaptformer"`` | ``mlp`` | :class:`ParallelAdapter` on ``block.mlp``: ``mlp(h) + gamma*alpha*up(act(down(h)))`` |
| ``"adapter"`` | ``attn``, ``mlp`` | :class:`SequentialAdapter` after ``block.attn`` / ``block.mlp`` (Houlsby) |

AdaptFormer's input is ``h = norm2(x)``, the MLP sub-block's own input (the paper's ``mlp(LN(x)) + ...``): wrapping
``block.mlp`` keeps timm's ``Block.forward`` untouched, so ``torch.compile`` and ``state_dict`` keep working, and the
adapter output passes through the block's layer scale and drop path like the MLP output it is added to.

Everything is frozen except PEFT weights, modulators and the classifier head (``modules_to_save``). The injection
config stays on the model as ``model.metapeft_config`` (an :class:`InjectionConfig`) for the gamma table, saving and
PEFT export.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metapeft.layers import FusedMetaAdapter, FusedMetaLoRA, MetaPEFTModule, ParallelAdapter, SequentialAdapter
from metapeft.params import mark_only_peft_trainable, meta_parameters, peft_parameters

POSITIONS = {
    "lora": ("q", "k", "v", "out", "mlp1", "mlp2"),
    "adaptformer": ("mlp",),
    "adapter": ("attn", "mlp"),
}
METHODS = tuple(POSITIONS)
QKV_SEGMENT = {"q": 0, "k": 1, "v": 2}
LORA_TARGET = {"out": "attn.proj", "mlp1": "mlp.fc1", "mlp2": "mlp.fc2"}
ADAPTER_TARGET = {"attn": "attn", "mlp": "mlp"}
CONFIG_ATTRIBUTE = "metapeft_config"


@dataclass(frozen=True)
class Placement:
    """One placed PEFT module: its qualified name, its gamma-table row and the column of each of its gammas."""

    module: str
    row: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class InjectionConfig:
    """What :func:`inject` did, kept on the model as ``model.metapeft_config`` (JSON-serialisable via
    :meth:`to_dict`). ``rows`` / ``columns`` are the gamma table's labels: blocks x positions on a ViT, module
    names x segments on the generic path."""

    method: str
    rank: int
    alpha: float
    dropout: float
    meta: bool
    init_gamma: float
    constraint: str
    activation: str
    backend: str
    positions: tuple[str, ...]
    layers: tuple[int, ...]
    target_modules: str | tuple[str, ...] | None
    modules_to_save: tuple[str, ...]
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    placements: tuple[Placement, ...]

    # Fields that change no weight's meaning: a file saved under one value loads under another.
    RUNTIME_FIELDS = ("dropout", "init_gamma", "backend")

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> InjectionConfig:
        """Inverse of :meth:`to_dict` (lists back to tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ValueError(f"injection config fields {sorted(data)} do not match the expected {sorted(names)}")
        values = dict(data)
        targets = values["target_modules"]
        values["target_modules"] = tuple(targets) if isinstance(targets, list) else targets
        for key in ("positions", "layers", "modules_to_save", "rows", "columns"):
            values[key] = tuple(values[key])
        values["placements"] = tuple(
            Placement(p["module"], p["row"], tuple(p["columns"])) for p in values["placements"]
        )
        return cls(**values)

    def structural_differences(self, other: InjectionConfig) -> list[str]:
        """``"field: self value != other value"`` for every field that decides the weights' shapes or meaning."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key}: {mine[key]!r} != {theirs[key]!r}" for key in mine
                if key not in self.RUNTIME_FIELDS and mine[key] != theirs[key]]

    def inject_kwargs(self) -> dict:
        """Keyword arguments of :func:`inject` that rebuild this injection on a fresh copy of the model."""
        kwargs = {key: getattr(self, key) for key in ("method", "rank", "alpha", "dropout", "meta", "init_gamma",
                                                       "constraint", "activation", "backend", "modules_to_save")}
        if self.target_modules is not None:
            return {**kwargs, "target_modules": self.target_modules}
        return {**kwargs, "positions": self.positions, "layers": list(self.layers)}


@dataclass(frozen=True)
class InjectionSummary:
    """What :func:`inject` placed: ``placements`` as ``(row, column)`` pairs (``("3", "v")`` = block 3, position
    v), the PEFT modules' qualified names and parameter counts (numbers of elements)."""

    method: str
    placements: tuple[tuple[str, str], ...]
    modules: tuple[str, ...]
    peft_parameters: int
    meta_parameters: int
    trainable_parameters: int
    total_parameters: int

    def __str__(self) -> str:
        return (f"metapeft {self.method}: {len(self.modules)} modules, {len(self.placements)} modulated outputs; "
                f"trainable {self.trainable_parameters:,} of {self.total_parameters:,} parameters "
                f"(PEFT {self.peft_parameters:,}, meta {self.meta_parameters:,})")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` and ``DistributedDataParallel`` / ``DataParallel`` wrappers, in any
    nesting (or ``model`` itself)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def injection_config(model: nn.Module) -> InjectionConfig:
    """The :class:`InjectionConfig` :func:`inject` left on ``model``; a clear error when there is none."""
    config = getattr(unwrap_model(model), CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError("model has no metapeft injection; call metapeft.inject(model, ...) first")
    return config


def vit_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    """``model.blocks`` of a timm-style ViT, each block with ``attn.qkv``/``attn.proj``/``mlp.fc1``/``mlp.fc2``
    Linears; a clear error otherwise."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(f"{type(model).__name__} has no timm ViT `blocks`; pass target_modules=... to inject "
                        "into Linear layers by name")
    for i, block in enumerate(blocks):
        for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            try:
                layer = block.get_submodule(path)
            except AttributeError:
                layer = None
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"block {i} of {type(model).__name__} has no nn.Linear at {path!r} (found "
                                f"{type(layer).__name__}); pass target_modules=... to inject by name")
    return blocks


def _resolve_positions(method: str, positions: Sequence[str] | None) -> tuple[str, ...]:
    valid = POSITIONS[method]
    if positions is None:
        return valid
    if isinstance(positions, str):
        positions = (positions,)
    positions = tuple(positions)
    unknown = [p for p in positions if p not in valid]
    if unknown or not positions or len(set(positions)) != len(positions):
        raise ValueError(f"positions for method={method!r} must be distinct names from {valid}, got {positions}")
    return tuple(p for p in valid if p in positions)


def _resolve_layers(layers: str | Sequence[int], count: int) -> tuple[int, ...]:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or a list of block indices, got {layers!r}")
        return tuple(range(count))
    chosen = tuple(layers)
    if (not chosen or len(set(chosen)) != len(chosen)
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in chosen)):
        raise ValueError(f"layers must be distinct block indices in [0, {count}), got {layers!r}")
    return tuple(sorted(chosen))


def _matches(name: str, target_modules: str | tuple[str, ...]) -> bool:
    """PEFT's rule: a string is a regex the whole name must match; a list matches a name or a name's suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _default_modules_to_save(model: nn.Module) -> tuple[str, ...]:
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return ()
    head = get_classifier()
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        return ()
    return tuple(name for name, module in model.named_modules() if module is head)[:1]


class _Builder:
    """Builds one PEFT module per call with the shared hyperparameters of an :func:`inject` call."""

    def __init__(self, method, rank, alpha, dropout, meta, init_gamma, constraint, activation, backend):
        self.method, self.rank, self.dropout, self.meta = method, rank, dropout, meta
        self.init_gamma, self.constraint, self.activation, self.backend = init_gamma, constraint, activation, backend
        self.alpha = float((rank if method == "lora" else 1.0) if alpha is None else alpha)

    def lora(self, base: nn.Linear, segments: int = 1, active: tuple[int, ...] | None = None) -> FusedMetaLoRA:
        return FusedMetaLoRA(base, rank=self.rank, alpha=self.alpha, segments=segments, dropout=self.dropout,
                             init_gamma=self.init_gamma, constraint=self.constraint, backend=self.backend,
                             active_segments=active, meta=self.meta)

    def adapter(self, dim: int, like: torch.Tensor) -> FusedMetaAdapter:
        """An adapter on ``like``'s device with PEFT weights in ``like``'s dtype (the modulator stays float32,
        as in ``FusedMetaLoRA``)."""
        kind = "parallel" if self.method == "adaptformer" else "sequential"
        adapter = FusedMetaAdapter(dim, self.rank, alpha=self.alpha, kind=kind, activation=self.activation,
                                   dropout=self.dropout, init_gamma=self.init_gamma, constraint=self.constraint,
                                   backend=self.backend, meta=self.meta).to(like.device)
        for weight in adapter.peft_parameters():
            weight.data = weight.data.to(like.dtype)
        return adapter

    def wrap(self, module: nn.Module, dim: int, like: torch.Tensor) -> nn.Module:
        wrapper = ParallelAdapter if self.method == "adaptformer" else SequentialAdapter
        return wrapper(module, self.adapter(dim, like))


def _vit_replacements(model, builder, positions, chosen) -> tuple[list[tuple[str, nn.Module, Placement]], tuple]:
    """``(name, new module, placement)`` per module to place in the chosen blocks, and the table's row labels."""
    blocks = vit_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    replacements = []
    for i in chosen:
        block, block_name = blocks[i], f"{prefix}.{i}"
        if builder.method == "lora":
            qkv_positions = tuple(p for p in positions if p in QKV_SEGMENT)
            if qkv_positions:
                lora = builder.lora(block.attn.qkv, segments=3, active=tuple(QKV_SEGMENT[p] for p in qkv_positions))
                name = f"{block_name}.attn.qkv"
                replacements.append((name, lora, Placement(name, str(i), qkv_positions)))
            for position in (p for p in positions if p in LORA_TARGET):
                name = f"{block_name}.{LORA_TARGET[position]}"
                replacements.append((name, builder.lora(model.get_submodule(name)), Placement(name, str(i),
                                                                                            (position,))))
        else:
            dim, like = block.attn.proj.out_features, block.attn.proj.weight
            for position in positions:
                name = f"{block_name}.{ADAPTER_TARGET[position]}"
                wrapper = builder.wrap(model.get_submodule(name), dim, like)
                replacements.append((name, wrapper, Placement(f"{name}.adapter", str(i), (position,))))
    return replacements, tuple(str(i) for i in range(len(blocks)))


def _generic_replacements(model, builder, target_modules) -> list[tuple[str, nn.Module, Placement]]:
    """``(name, new module, placement)`` for every ``nn.Linear`` whose qualified name matches ``target_modules``."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name and _matches(name, target_modules)]
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in {type(model).__name__}")
    replacements = []
    for name, linear in targets:
        if builder.method == "lora":
            replacements.append((name, builder.lora(linear), Placement(name, name, ("gamma",))))
            continue
        if builder.method == "adaptformer" and linear.in_features != linear.out_features:
            raise ValueError(f"method='adaptformer' adds an adapter beside {name!r}, which needs in_features == "
                             f"out_features, got {linear.in_features} -> {linear.out_features}")
        wrapper = builder.wrap(linear, linear.out_features, linear.weight)
        replacements.append((name, wrapper, Placement(f"{name}.adapter", name, ("gamma",))))
    return replacements


def inject(
    model: nn.Module,
    method: str = "lora",
    positions: Sequence[str] | None = None,
    layers: str | Sequence[int] = "all",
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    meta: bool = True,
    backend: str = "auto",
    target_modules: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    init_gamma: float = 1.0,
    constraint: str = "softplus",
    activation: str = "relu",
) -> InjectionSummary:
    """Place MetaPEFT modules into ``model`` in place and freeze all but them and the head.

    Args:
        model: a timm ``VisionTransformer`` (any size, patch size or pre-norm variant), or any model when
            ``target_modules`` is given.
        method: ``"lora"`` (``FusedMetaLoRA``), ``"adaptformer"`` (parallel ``FusedMetaAdapter`` beside each
            MLP) or ``"adapter"`` (Houlsby, sequential ``FusedMetaAdapter`` after attention and/or MLP).
        positions: ViT positions; default all of the method's: ``("q", "k", "v", "out", "mlp1", "mlp2")`` for
            LoRA, ``("mlp",)`` for AdaptFormer, ``("attn", "mlp")`` for adapters.
        layers: ``"all"`` or a list of block indices.
        rank: LoRA rank r, or the adapter bottleneck.
        alpha: LoRA alpha (default ``rank``: scale gamma) or the adapter scale (default 1).
        dropout, init_gamma, constraint, backend, activation: passed to each module.
        meta: learnable modulators (MetaPEFT) or a fixed scale (``False``: plain PEFT, the baseline).
        target_modules: the generic path instead of ViT positions: a regex every qualified name must match
            in full, or a list of names / name suffixes (PEFT's rule); every matching ``nn.Linear`` gets a module.
        modules_to_save: qualified names of modules kept trainable and saved with the adapter; default the
            timm classifier head (``model.get_classifier()``) when there is one.

    Returns an :class:`InjectionSummary`; the config is kept as ``model.metapeft_config``.
    """
    model = unwrap_model(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if getattr(model, CONFIG_ATTRIBUTE, None) is not None or any(isinstance(m, MetaPEFTModule)
                                                                   for m in model.modules()):
        raise ValueError("model already holds metapeft modules; inject once per model")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    for name, value in (("alpha", alpha), ("dropout", dropout), ("init_gamma", init_gamma)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    builder = _Builder(method, rank, alpha, dropout, meta, init_gamma, constraint, activation, backend)
    if target_modules is not None:
        if positions is not None or layers != "all":
            raise ValueError("positions and layers select ViT blocks; with target_modules leave them unset")
        if not isinstance(target_modules, str):
            target_modules = tuple(target_modules)
        replacements = _generic_replacements(model, builder, target_modules)
        resolved_positions, chosen_layers = (), ()
        rows, columns = tuple(p.row for _, _, p in replacements), ("gamma",)
    else:
        resolved_positions = _resolve_positions(method, positions)
        chosen_layers = _resolve_layers(layers, len(vit_blocks(model)))
        replacements, rows = _vit_replacements(model, builder, resolved_positions, chosen_layers)
        columns = POSITIONS[method]
    modules_to_save = _default_modules_to_save(model) if modules_to_save is None else tuple(modules_to_save)
    extra = []
    for name in modules_to_save:
        try:
            extra.append(model.get_submodule(name))
        except AttributeError as error:
            raise ValueError(f"modules_to_save names {name!r}, which is not a module of the model") from error
    for name, module, _ in replacements:
        replace_module(model, name, module)
    mark_only_peft_trainable(model, extra=tuple(extra))
    placements = tuple(p for _, _, p in replacements)
    config = InjectionConfig(
        method=method, rank=rank, alpha=builder.alpha, dropout=float(dropout), meta=bool(meta),
        init_gamma=float(init_gamma), constraint=constraint, activation=activation, backend=backend,
        positions=resolved_positions, layers=chosen_layers, target_modules=target_modules,
        modules_to_save=modules_to_save, rows=rows, columns=columns, placements=placements,
    )
    setattr(model, CONFIG_ATTRIBUTE, config)
    return InjectionSummary(
        method=method,
        placements=tuple((p.row, c) for p in placements for c in p.columns),
        modules=tuple(p.module for p in placements),
        peft_parameters=sum(p.numel() for p in peft_parameters(model)),
        meta_parameters=sum(p.numel() for p in meta_parameters(model)),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in model.parameters()),
    )


def peft_modules(model: nn.Module) -> list[tuple[str, MetaPEFTModule]]:
    """``(qualified name, module)`` of every metapeft PEFT module in ``model``, in module order."""
    return [(name, m) for name, m in unwrap_model(model).named_modules() if isinstance(m, MetaPEFTModule)]


def _mergeable(model: nn.Module) -> list[FusedMetaLoRA]:
    modules = peft_modules(model)
    unmergeable = [name for name, m in modules if not isinstance(m, FusedMetaLoRA)]
    if unmergeable:
        raise ValueError(f"adapters have a nonlinearity and cannot be merged into weights: {unmergeable[:3]}")
    if not modules:
        raise ValueError("model holds no metapeft modules to merge")
    return [m for _, m in modules]


def merge(model: nn.Module) -> int:
    """Fold every ``FusedMetaLoRA``'s ``gamma * alpha/r * B A`` into its frozen weight (zero-overhead inference);
    returns the number merged. Adapters cannot be merged, nor modules with a non-finite gamma or LoRA weight
    (clear error naming them, nothing changed)."""
    modules = _mergeable(model)
    merged = [m for m in modules if m.merged]
    if merged:
        raise RuntimeError(f"{len(merged)} of {len(modules)} LoRA modules are already merged")
    names = {id(m): name for name, m in peft_modules(model)}
    finite = torch.stack([torch.isfinite(m.delta_weight()).all() for m in modules]).tolist()
    bad = [names[id(m)] for m, ok in zip(modules, finite) if not ok]
    if bad:
        raise ValueError(f"cannot merge: non-finite gamma or LoRA weights in {len(bad)} module(s) {bad[:3]}; "
                         "merging would write NaN/inf into the frozen base weights")
    for module in modules:
        module.merge()
    return len(modules)


def unmerge(model: nn.Module) -> int:
    """Undo :func:`merge` (exact up to the weight dtype's rounding); returns the number unmerged."""
    modules = _mergeable(model)
    unmerged = [m for m in modules if not m.merged]
    if unmerged:
        raise RuntimeError(f"{len(unmerged)} of {len(modules)} LoRA modules are not merged")
    for module in modules:
        module.unmerge()
    return len(modules)
