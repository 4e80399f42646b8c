"""The meta step on a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): the look-ahead runs over the
full (unsharded) parameters, gathered once per meta step.

Why FSDP2 cannot simply be differentiated through: outside a forward, FSDP2 registers each module's *sharded*
parameters (``DTensor`` ``Parameter`` objects, this rank's rows) on the module, so ``model.parameters()`` returns
them; its forward pre-hook all-gathers them into separate *unsharded* ``Parameter`` objects and registers those
instead, and its post-forward / post-backward hooks put the sharded ones back and free the unsharded storage
(``resize_(0)``). A meta step that differentiates with respect to the sharded parameters gets zeros (the graph only
reaches the unsharded ones: a hypergradient 100 % off, silently); the phi it swaps in for the look-ahead is replaced
by FSDP's own unsharded parameters in the pre-hook; and its double-differentiable graph keeps unsharded weights whose
storage FSDP frees after the forward (a segmentation fault in the second backward).

What this module does instead (:func:`gathered`): put every FSDP module of the model in its sharded state
(``FSDPModule.reshard``), all-gather each sharded parameter once into a new full ``Parameter`` registered in its
place (``DTensor.full_tensor``), switch FSDP's forward hooks off for the duration (the model is then a plain module
over full parameters, and FSDP's own state never changes), run the meta step exactly as on a
``DistributedDataParallel`` model (every rank a shard of the batch, sums over ranks by all-reduce,
:mod:`metapeft.meta.distributed`), then put the sharded parameters and the hooks back. :func:`sharded_hypergradient`
wraps :func:`metapeft.meta.hypergradient` so: its results come back laid out like the parameters (``DTensor`` with
the sharded parameter's mesh and placements, this rank's rows, cut locally without communication).

What it costs: for the duration of a meta step every rank holds the whole unsharded model (frozen weights, phi, rho),
as without FSDP, beside its shards, and the meta step's activations and graphs at its local batch; FSDP's
one-block-at-a-time bound on parameter memory holds for the plain training steps only. The exact mode keeps every
layer's weights in its double-differentiable graph until the reverse pass anyway, so a per-block gather would not
lower its peak. Communication: one all-gather per parameter (the whole model) per meta step, then all-reduces of
phi-sized tensors (LoRA weights, head) as on DDP, where a plain FSDP step reduce-scatters them.

Supported: ``fully_shard`` on a 1-D mesh (FSDP) or a 2-D (replicate, shard) mesh (HSDP), every FSDP module sharing
one mesh whose ranks each hold a shard of the batch. A ``MixedPrecisionPolicy`` does not apply inside the meta step:
it runs at the parameters' own dtype, as the unsharded model would (autocast lowers it). Refused with an error before
any gather: CPU offload, other placements (FSDP composed with tensor parallelism), and ``lr_scales`` given
as ``DTensor`` (computed from the sharded modulators; the meta step differentiates the gathered ones: pass a callable
such as :func:`metapeft.params.module_lr_scales`, called inside).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from metapeft.params import meta_parameters, trainable_phi

# ids of the FSDP modules inside a gathered() block: a hypergradient there takes the plain path
_GATHERED: set[int] = set()


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that ``fully_shard`` was applied to, in module order."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 modules outside a :func:`gathered` block."""
    return any(id(m) not in _GATHERED for m in fsdp_modules(model))


def _forward_hook_handles(modules: list[nn.Module]) -> list:
    """The handles of FSDP's forward (pre-)hooks of ``modules``."""
    handles = []
    for module in modules:
        state = fully_shard.state(module)
        try:
            pair = (state._pre_forward_hook_handle, state._post_forward_hook_handle)
        except AttributeError:
            raise RuntimeError(f"this torch ({torch.__version__}) keeps FSDP2's forward hooks where metapeft does not "
                               f"look for them; the meta step cannot switch them off") from None
        handles.extend(pair)
    return handles


def _hook_ids(handles: list) -> set[int]:
    """Ids of the hooks behind ``handles`` (a ``RemovableHandle`` or a handle grouping several)."""
    ids = set()
    for handle in handles:
        ids.update(h.id for h in getattr(handle, "handles", (handle,)))
    return ids


def _check_sharded(sharded: list[DTensor]) -> Any:
    """The one device mesh of the sharded parameters; errors for placements other than FSDP's / HSDP's and for
    parameters offloaded to another device than the mesh's."""
    meshes = {p.device_mesh for p in sharded}
    if len(meshes) != 1:
        raise ValueError(f"the FSDP2 modules' parameters lie on {len(meshes)} different device meshes; the meta step "
                         f"needs one (every rank a data-parallel shard of the batch)")
    (mesh,) = meshes
    for p in sharded:
        placements = tuple(p.placements)
        fsdp = len(placements) == 1 and type(placements[0]) is Shard
        hsdp = len(placements) == 2 and isinstance(placements[0], Replicate) and type(placements[1]) is Shard
        if not (fsdp or hsdp):
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has placements {placements}; the meta step "
                             f"supports FSDP (Shard) and HSDP (Replicate, Shard) only, not FSDP composed with "
                             f"tensor parallelism")
        if p.device.type != mesh.device_type:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is offloaded to {p.device.type} (mesh on "
                             f"{mesh.device_type}); the meta step does not support FSDP2's CPU offload")
    return mesh


def _default_reduce(mesh, reduce):
    """``reduce`` or, when None, the process group of every rank of ``mesh`` (each holds a shard of the batch)."""
    if reduce is not None:
        return reduce
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(f"the FSDP2 mesh spans {mesh.size()} of {dist.get_world_size()} ranks: pass reduce=<the process "
                     f"group whose ranks each hold a shard of the batch>")


@contextlib.contextmanager
def _forward_hooks_off(model: nn.Module, ids: set[int]) -> Iterator[None]:
    """Inside the block no module of ``model`` runs the forward (pre-)hooks with these ids; others still run."""
    saved = []
    for module in model.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(module, attr)
            if ids.intersection(hooks):
                saved.append((module, attr, hooks))
                setattr(module, attr, type(hooks)((k, h) for k, h in hooks.items() if k not in ids))
    try:
        yield
    finally:
        for module, attr, hooks in saved:
            setattr(module, attr, hooks)


class Gathered:
    """The parameters of a :func:`gathered` block: maps each unsharded ``Parameter`` registered on the model inside
    the block to the sharded one it stands for, and gives the process group the meta step sums over.

    Attributes:
        reduce: the ``reduce`` argument of the meta step (the caller's, else the mesh's ranks' group).
    """

    def __init__(self, sharded_of: dict[int, DTensor], reduce) -> None:
        self._sharded_of, self.reduce = sharded_of, reduce

    def sharded(self, tensors: list[torch.Tensor], params: list[nn.Parameter]) -> list[torch.Tensor]:
        """``tensors`` (full values, one per parameter of ``params``, the unsharded parameters inside the block),
        each laid out like its sharded parameter: a ``DTensor`` on its mesh with its placements, holding this
        rank's rows (cut locally, no communication; every rank holds the same full values). A tensor whose
        parameter FSDP does not shard is returned as it is."""
        out = []
        for t, p in zip(tensors, params):
            s = self._sharded_of.get(id(p))
            out.append(t if s is None else
                       distribute_tensor(t.detach(), s.device_mesh, s.placements, src_data_rank=None))
        return out


@contextlib.contextmanager
def full_copies(model: nn.Module, only: list[nn.Parameter] | None = None) -> Iterator[dict[int, DTensor]]:
    """Inside the block, each sharded (``DTensor``) parameter of ``model`` (of ``only``, when given: e.g. the
    modulators) is replaced, in every module slot that holds it, by a new ``Parameter`` with its full value
    (``DTensor.full_tensor``: a collective, every rank enters the block together; same dtype and ``requires_grad``;
    a tied parameter stays tied); on exit the sharded ones come back and what was written to the copies is lost. Every
    FSDP module is first put in its sharded state (``FSDPModule.reshard``). FSDP's hooks stay on: run no forward
    inside (:func:`gathered` does). Yields ``{id(full copy): sharded parameter}``."""
    for module in fsdp_modules(model):
        module.reshard()
    chosen = None if only is None else {id(p) for p in only}
    slots = [(module, name, p) for module in model.modules() for name, p in module._parameters.items()
             if isinstance(p, DTensor) and (chosen is None or id(p) in chosen)]
    full_of = {}
    for _, _, p in slots:
        if id(p) not in full_of:
            full_of[id(p)] = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
    try:
        for module, name, p in slots:
            module._parameters[name] = full_of[id(p)]
        yield {id(full_of[id(p)]): p for _, _, p in slots}
    finally:
        for module, name, p in slots:
            module._parameters[name] = p


@contextlib.contextmanager
def gathered(model: nn.Module, reduce: dist.ProcessGroup | Callable | None = None) -> Iterator[Gathered]:
    """Inside the block, ``model`` (with FSDP2 modules) is a plain module over its full parameters: every sharded
    parameter is all-gathered once into a full copy registered in its place (:func:`full_copies`) and FSDP's forward
    hooks are switched off; on exit the sharded parameters and the hooks come back (FSDP's own state never leaves
    "sharded", so its state-dict hooks do nothing inside and a ``state_dict()`` there holds the full tensors). What is
    written to the full parameters inside is lost. Inside another such block of the same model it changes nothing.
    Yields a :class:`Gathered`. Errors (module docstring) are raised before anything is gathered."""
    modules = fsdp_modules(model)
    if not is_fully_sharded(model):  # already gathered (or no FSDP at all): the parameters are full
        yield Gathered({}, reduce)
        return
    hook_ids = _hook_ids(_forward_hook_handles(modules))
    for module in modules:
        module.reshard()
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    if not sharded:
        raise ValueError("the model's FSDP2 modules hold no sharded parameter")
    reduce = _default_reduce(_check_sharded(sharded), reduce)
    with full_copies(model) as sharded_of, _forward_hooks_off(model, hook_ids):
        _GATHERED.update(id(m) for m in modules)
        try:
            yield Gathered(sharded_of, reduce)
        finally:
            _GATHERED.difference_update(id(m) for m in modules)


def gather_full(state):
    """``state`` (tensors, None, nested in lists, tuples and dicts) with each ``DTensor`` gathered to its full value,
    detached (a collective, in the same order on every rank); everything else as it is."""
    if isinstance(state, DTensor):
        return state.detach().full_tensor()
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a NamedTuple, e.g. AdamWState
        return type(state)(*(gather_full(s) for s in state))
    if isinstance(state, (list, tuple)):
        return type(state)(gather_full(s) for s in state)
    if isinstance(state, dict):
        return {k: gather_full(v) for k, v in state.items()}
    return state


def sharded_hypergradient(hypergradient: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    """``hypergradient(**arguments)`` on an FSDP2 model: run over the gathered parameters (module docstring), its
    results laid out like the sharded parameters.

    arguments: :func:`metapeft.meta.hypergradient`'s arguments by name. ``momentum_buffers`` (and an inner rule's
    ``inner_state``) may hold ``DTensor`` (the FSDP optimizer's state; gathered); ``lr_scales`` must hold no
    ``DTensor`` (a callable computes them inside, from the gathered modulators); ``reduce`` None means every rank of
    the FSDP mesh. Returns its ``HypergradientResult`` with ``meta_grads``, ``lookahead`` and ``phi_grads`` as
    ``DTensor`` like the modulators and phi."""
    scales = arguments["lr_scales"]
    if scales is not None and not callable(scales) and any(isinstance(d, DTensor) for d in scales):
        raise ValueError("lr_scales on an FSDP2 model must not hold DTensors: pass a callable (model, phi) -> scales, "
                         "e.g. metapeft.params.module_lr_scales; the meta step gathers the modulators and computes "
                         "the scales from the gathered ones")
    model = arguments["model"]
    with gathered(model, arguments["reduce"]) as full:
        # optimizer state (SGD's momentum buffers, another inner rule's state) from the FSDP optimizer is sharded
        states = {k: gather_full(v) for k, v in arguments.items() if k in ("momentum_buffers", "inner_state")}
        result = hypergradient(**{**arguments, **states, "reduce": full.reduce})
        phi, rho = trainable_phi(model), meta_parameters(model)
        return dataclasses.replace(result, meta_grads=full.sharded(result.meta_grads, rho),
                                   lookahead=full.sharded(result.lookahead, phi),
                                   phi_grads=full.sharded(result.phi_grads, phi))
