"""Put metapeft modules into a model: timm Vision Transformers by (layer, position), any model by Linear name.

What to place is one :class:`InjectionConfig` (the single source of :func:`inject`'s keywords, of the run yaml's
``peft:`` section and of the adapter files' metadata); where to place it is decided by the placement strategies in
:data:`PLACEMENT_STRATEGIES`, tried in order (HF PEFT's dispatchers): the first that recognises the model and the
config plans every replacement before anything changes.

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

Everything is frozen except PEFT weights, modulators and the classifier head (``modules_to_save``). What was placed
stays on the model as ``model.metapeft_config`` (an :class:`Injection`) for the gamma table, saving and PEFT export.
Merging LoRA into the frozen weights lives in :mod:`metapeft.merging`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metapeft.layers import FusedMetaAdapter, FusedMetaLoRA, MetaPEFTModule, ParallelAdapter, SequentialAdapter
from metapeft.layers.base import check_gamma_granularity
from metapeft.params import mark_only_peft_trainable, meta_parameters, peft_parameters
from metapeft.schema import option, options_text

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


def _finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _names(value, what: str) -> tuple[str, ...]:
    """A string or a sequence of strings as a tuple of strings; a ``ValueError`` naming ``what`` otherwise."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a name or a list of names, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class InjectionConfig:
    """What :func:`inject` places: the one definition of its keywords, of the run yaml's ``peft:`` section and of the
    injection stored in adapter files. Lists become tuples; every field is checked at construction (what needs the
    model, e.g. block indices in range, is checked by :func:`inject`)."""

    method: str = option("lora", "'lora' (FusedMetaLoRA), 'adaptformer' (parallel adapter beside each MLP) or "
                                 "'adapter' (Houlsby: sequential adapters after attention and/or MLP)")
    positions: tuple[str, ...] | None = option(
        None, "ViT positions; null: all of the method's (lora: q, k, v, out, mlp1, mlp2; adaptformer: mlp; adapter: "
              "attn, mlp)")
    layers: str | tuple[int, ...] = option("all", "'all' or a list of ViT block indices")
    rank: int = option(8, "LoRA rank r, or the adapter bottleneck width")
    alpha: float | None = option(None, "LoRA alpha (null: the rank, so the scale is gamma) or the adapter scale "
                                       "(null: 1)")
    dropout: float = option(0.0, "dropout on the PEFT branch's input")
    meta: bool = option(True, "learnable modulators gamma (MetaPEFT); false: a fixed scale (plain PEFT, the "
                              "baseline)")
    backend: str = option("auto", "kernel backend of every module: auto, torch, triton or cuda")
    target_modules: str | tuple[str, ...] | None = option(
        None, "instead of ViT positions: a regex every qualified module name must match in full, or a list of names "
              "or name suffixes (HF PEFT's rule); every matching nn.Linear gets a module")
    modules_to_save: tuple[str, ...] | None = option(
        None, "qualified names of modules kept trainable and saved with the adapter; null: the timm classifier head")
    init_gamma: float = option(1.0, "gamma of every module at the start")
    constraint: str = option("softplus", "how gamma follows from the raw modulator (softplus keeps it positive)")
    activation: str = option("relu", "the adapters' bottleneck activation")
    gamma: str = option("scalar", "gamma granularity: 'scalar' (one gamma per module, per q/k/v segment of a fused "
                                  "qkv: the paper) or 'channel' (one per output channel: the authors' code's "
                                  "modulator vector)")

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise lists from yaml or keywords into tuples
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.positions is not None:
            positions = _names(self.positions, "positions")
            valid = POSITIONS[self.method]
            if not positions or len(set(positions)) != len(positions) or not set(positions) <= set(valid):
                raise ValueError(f"positions for method={self.method!r} must be distinct names from {valid}, got "
                                 f"{self.positions!r}")
            set_(self, "positions", tuple(p for p in valid if p in positions))
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"layers must be 'all' or a list of block indices, got {self.layers!r}")
        else:
            chosen = tuple(self.layers) if isinstance(self.layers, Sequence) else None
            if (not chosen or len(set(chosen)) != len(chosen)
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in chosen)):
                raise ValueError(f"layers must be 'all' or distinct block indices >= 0, got {self.layers!r}")
            set_(self, "layers", tuple(sorted(chosen)))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        for name in ("alpha", "dropout", "init_gamma"):
            value = getattr(self, name)
            if not (value is None and name == "alpha") and not _finite_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.meta, bool):
            raise ValueError(f"meta must be true or false, got {self.meta!r}")
        for name in ("backend", "constraint", "activation"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        check_gamma_granularity(self.gamma)
        if self.target_modules is not None:
            if self.positions is not None or self.layers != "all":
                raise ValueError("positions and layers select ViT blocks; with target_modules leave them unset")
            if not isinstance(self.target_modules, str):
                set_(self, "target_modules", _names(self.target_modules, "target_modules"))
        if self.modules_to_save is not None:
            set_(self, "modules_to_save", _names(self.modules_to_save, "modules_to_save"))

    @classmethod
    def options(cls) -> tuple[dataclasses.Field, ...]:
        """The fields of a plain injection config (an :class:`Injection`'s record fields excluded)."""
        return dataclasses.fields(InjectionConfig)

    def as_config(self) -> InjectionConfig:
        """A plain :class:`InjectionConfig` with this one's option values (for an :class:`Injection`: the config
        that repeats it)."""
        return InjectionConfig(**{f.name: getattr(self, f.name) for f in self.options()})

    def resolved_alpha(self) -> float:
        """``alpha``, or its default: the rank for LoRA (scale gamma), 1 for adapters."""
        return float((self.rank if self.method == "lora" else 1.0) if self.alpha is None else self.alpha)


@dataclass(frozen=True)
class Placement:
    """One placed PEFT module: its qualified name, its gamma-table row and the column of each of its gammas."""

    module: str
    row: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Injection(InjectionConfig):
    """What :func:`inject` did, kept on the model as ``model.metapeft_config`` and stored in adapter files
    (:meth:`to_dict`): the config resolved against the model (``alpha`` a number, ``positions`` and ``layers`` the
    placed ones on a ViT, ``modules_to_save`` the kept modules) plus where each module went (``placements``) and the
    gamma table's labels (``rows`` x ``columns``: blocks x positions on a ViT, module names x ``gamma`` when placed
    by name). Passing it to :func:`inject` repeats the injection on a fresh copy of the model."""

    rows: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    placements: tuple[Placement, ...] = ()

    # Fields that change no weight's meaning: a file saved under one value loads under another.
    RUNTIME_FIELDS = ("dropout", "init_gamma", "backend")

    def to_dict(self) -> dict:
        """A JSON-ready dict (the adapter files' ``metapeft_config`` metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Injection:
        """Inverse of :meth:`to_dict` (lists back to tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(data)
        if "gamma" not in values and set(data) == names - {"gamma"}:
            values["gamma"] = "scalar"  # files written before gamma granularity was an option
        elif set(data) != names:
            raise ValueError(f"injection config fields {sorted(data)} do not match the expected {sorted(names)}")
        if values["target_modules"] is not None and values["positions"] == [] and values["layers"] == []:
            values.update(positions=None, layers="all")  # files written before InjectionConfig checked its fields
        for key in ("rows", "columns"):
            values[key] = tuple(values[key])
        values["placements"] = tuple(
            Placement(p["module"], p["row"], tuple(p["columns"])) for p in values["placements"]
        )
        return cls(**values)

    def structural_differences(self, other: Injection) -> list[str]:
        """``"field: self value != other value"`` for every field that decides the weights' shapes or meaning."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key}: {mine[key]!r} != {theirs[key]!r}" for key in mine
                if key not in self.RUNTIME_FIELDS and mine[key] != theirs[key]]


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


def injection_config(model: nn.Module) -> Injection:
    """The :class:`Injection` :func:`inject` left on ``model``; a clear error when there is none."""
    config = getattr(unwrap_model(model), CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError("model has no metapeft injection; call metapeft.inject(model, ...) first")
    return config


def peft_modules(model: nn.Module) -> list[tuple[str, MetaPEFTModule]]:
    """``(qualified name, module)`` of every metapeft PEFT module in ``model``, in module order."""
    return [(name, m) for name, m in unwrap_model(model).named_modules() if isinstance(m, MetaPEFTModule)]


# ----- building modules ----------------------------------------------------------------------------------------------
class ModuleFactory:
    """Builds the PEFT modules of one :class:`InjectionConfig`."""

    def __init__(self, config: InjectionConfig) -> None:
        self.config, self.alpha = config, config.resolved_alpha()

    def lora(self, base: nn.Linear, segments: int = 1, active: tuple[int, ...] | None = None) -> FusedMetaLoRA:
        c = self.config
        return FusedMetaLoRA(base, rank=c.rank, alpha=self.alpha, segments=segments, dropout=c.dropout,
                             init_gamma=c.init_gamma, constraint=c.constraint, backend=c.backend,
                             active_segments=active, meta=c.meta, gamma=c.gamma)

    def adapter(self, dim: int, like: torch.Tensor) -> FusedMetaAdapter:
        """An adapter on ``like``'s device with PEFT weights in ``like``'s dtype (the modulator stays float32,
        as in ``FusedMetaLoRA``)."""
        c = self.config
        kind = "parallel" if c.method == "adaptformer" else "sequential"
        adapter = FusedMetaAdapter(dim, c.rank, alpha=self.alpha, kind=kind, activation=c.activation,
                                   dropout=c.dropout, init_gamma=c.init_gamma, constraint=c.constraint,
                                   backend=c.backend, meta=c.meta, gamma=c.gamma).to(like.device)
        for weight in adapter.peft_parameters():
            weight.data = weight.data.to(like.dtype)
        return adapter

    def wrap(self, module: nn.Module, dim: int, like: torch.Tensor) -> nn.Module:
        """``module`` with an adapter beside it (AdaptFormer) or after it (Houlsby)."""
        wrapper = ParallelAdapter if self.config.method == "adaptformer" else SequentialAdapter
        return wrapper(module, self.adapter(dim, like))


# ----- placement strategies ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlacementPlan:
    """A placement strategy's decision, made before the model changes: ``(qualified name, new module, placement)``
    per replacement, the gamma table's labels and the positions and layers it resolved (None and ``"all"`` where
    it places by name)."""

    replacements: tuple[tuple[str, nn.Module, Placement], ...]
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    positions: tuple[str, ...] | None
    layers: str | tuple[int, ...]


PlacementStrategy = Callable[[nn.Module, InjectionConfig, ModuleFactory], "PlacementPlan | None"]


def _matches(name: str, target_modules: str | tuple[str, ...]) -> bool:
    """PEFT's rule: a string is a regex the whole name must match; a list matches a name or a name's suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def place_by_name(model: nn.Module, config: InjectionConfig, factory: ModuleFactory) -> PlacementPlan | None:
    """``config.target_modules`` given: a module on every ``nn.Linear`` whose qualified name matches; None
    otherwise."""
    if config.target_modules is None:
        return None
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name and _matches(name, config.target_modules)]
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched no nn.Linear in {type(model).__name__}")
    replacements = []
    for name, linear in targets:
        if config.method == "lora":
            replacements.append((name, factory.lora(linear), Placement(name, name, ("gamma",))))
            continue
        if config.method == "adaptformer" and linear.in_features != linear.out_features:
            raise ValueError(f"method='adaptformer' adds an adapter beside {name!r}, which needs in_features == "
                             f"out_features, got {linear.in_features} -> {linear.out_features}")
        wrapper = factory.wrap(linear, linear.out_features, linear.weight)
        replacements.append((name, wrapper, Placement(f"{name}.adapter", name, ("gamma",))))
    return PlacementPlan(tuple(replacements), tuple(p.row for _, _, p in replacements), ("gamma",), None, "all")


def vit_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    """``model.blocks`` of a timm-style ViT, each block with ``attn.qkv``/``attn.proj``/``mlp.fc1``/``mlp.fc2``
    Linears; a clear error otherwise."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
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


def place_in_vit_blocks(model: nn.Module, config: InjectionConfig, factory: ModuleFactory) -> PlacementPlan | None:
    """A timm ViT (a ``blocks`` attribute): the config's positions in its chosen blocks (module docstring table);
    None for a model without ``blocks``."""
    if config.target_modules is not None or not hasattr(model, "blocks"):
        return None
    blocks = vit_blocks(model)
    positions = config.positions or POSITIONS[config.method]
    chosen = tuple(range(len(blocks))) if config.layers == "all" else config.layers
    if any(i >= len(blocks) for i in chosen):
        raise ValueError(f"layers must be distinct block indices in [0, {len(blocks)}), got {config.layers!r}")
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    replacements = []
    for i in chosen:
        block, block_name = blocks[i], f"{prefix}.{i}"
        if config.method == "lora":
            qkv_positions = tuple(p for p in positions if p in QKV_SEGMENT)
            if qkv_positions:
                lora = factory.lora(block.attn.qkv, segments=3, active=tuple(QKV_SEGMENT[p] for p in qkv_positions))
                name = f"{block_name}.attn.qkv"
                replacements.append((name, lora, Placement(name, str(i), qkv_positions)))
            for position in (p for p in positions if p in LORA_TARGET):
                name = f"{block_name}.{LORA_TARGET[position]}"
                placement = Placement(name, str(i), (position,))
                replacements.append((name, factory.lora(model.get_submodule(name)), placement))
        else:
            dim, like = block.attn.proj.out_features, block.attn.proj.weight
            for position in positions:
                name = f"{block_name}.{ADAPTER_TARGET[position]}"
                wrapper = factory.wrap(model.get_submodule(name), dim, like)
                replacements.append((name, wrapper, Placement(f"{name}.adapter", str(i), (position,))))
    return PlacementPlan(tuple(replacements), tuple(str(i) for i in range(len(blocks))), POSITIONS[config.method],
                         positions, chosen)


# Tried in order by inject(); the first that returns a plan places the modules. A strategy for another model family
# is a function of the same signature inserted here.
PLACEMENT_STRATEGIES: list[PlacementStrategy] = [place_by_name, place_in_vit_blocks]


def _default_modules_to_save(model: nn.Module) -> tuple[str, ...]:
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return ()
    head = get_classifier()
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        return ()
    return tuple(name for name, module in model.named_modules() if module is head)[:1]


def inject(model: nn.Module, config: InjectionConfig | None = None, /, **options) -> InjectionSummary:
    """Place MetaPEFT modules into ``model`` in place and freeze all but them and the head.

    ``model``: a timm ``VisionTransformer`` (any size, patch size or pre-norm variant), or any model when
    ``target_modules`` is given. What to place is an :class:`InjectionConfig`, given as the config object, as its
    fields by keyword (``inject(model, method="lora", rank=8)``), or both (keywords override the object's fields);
    the keywords are listed below. Where: the first of :data:`PLACEMENT_STRATEGIES` that recognises the model.
    Nothing changes when an argument is refused (the error names it).

    Returns an :class:`InjectionSummary`; the :class:`Injection` is kept as ``model.metapeft_config``.
    """
    model = unwrap_model(model)
    if config is None:
        config = InjectionConfig(**options)
    elif options:
        config = dataclasses.replace(config.as_config(), **options)
    else:
        config = config.as_config()
    if getattr(model, CONFIG_ATTRIBUTE, None) is not None or any(isinstance(m, MetaPEFTModule)
                                                                   for m in model.modules()):
        raise ValueError("model already holds metapeft modules; inject once per model")
    modules_to_save = _default_modules_to_save(model) if config.modules_to_save is None else config.modules_to_save
    extra = []
    for name in modules_to_save:
        try:
            extra.append(model.get_submodule(name))
        except AttributeError as error:
            raise ValueError(f"modules_to_save names {name!r}, which is not a module of the model") from error
    factory = ModuleFactory(config)
    plan = next((p for p in (strategy(model, config, factory) for strategy in PLACEMENT_STRATEGIES) if p), None)
    if plan is None:
        raise TypeError(f"{type(model).__name__} has no timm ViT `blocks`; pass target_modules=... to inject into "
                        "Linear layers by name")
    for name, module, _ in plan.replacements:
        replace_module(model, name, module)
    mark_only_peft_trainable(model, extra=tuple(extra))
    placements = tuple(p for _, _, p in plan.replacements)
    record = Injection(**{**{f.name: getattr(config, f.name) for f in InjectionConfig.options()},
                          "alpha": factory.alpha, "dropout": float(config.dropout),
                          "init_gamma": float(config.init_gamma), "positions": plan.positions,
                          "layers": plan.layers, "modules_to_save": modules_to_save},
                       rows=plan.rows, columns=plan.columns, placements=placements)
    setattr(model, CONFIG_ATTRIBUTE, record)
    return InjectionSummary(
        method=config.method,
        placements=tuple((p.row, c) for p in placements for c in p.columns),
        modules=tuple(p.module for p in placements),
        peft_parameters=sum(p.numel() for p in peft_parameters(model)),
        meta_parameters=sum(p.numel() for p in meta_parameters(model)),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in model.parameters()),
    )


if inject.__doc__:  # None under python -OO
    inject.__doc__ += "\nKeywords (the fields of :class:`InjectionConfig`):\n" + options_text(InjectionConfig) + "\n"
inject.__signature__ = inspect.Signature([
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_ONLY, annotation=nn.Module),
    inspect.Parameter("config", inspect.Parameter.POSITIONAL_ONLY, default=None),
    *(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
      for f in InjectionConfig.options()),
], return_annotation=InjectionSummary)
