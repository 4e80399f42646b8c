"""The trainer on an FSDP2-sharded model (``TrainerConfig(fsdp=True)``, or a model ``fully_shard`` was applied to).

A plain step runs FSDP2 as usual: a forward and a backward on every rank (an empty shard too, so FSDP's
collectives pair up), FSDP all-gathering one block at a time and reduce-scattering the gradient; phi's and rho's
optimizer states are sharded like them. Everything that reads or differentiates the whole model at once runs on the
model gathered once (:func:`metapeft.meta.fsdp.gathered`): the meta step (:func:`metapeft.meta.hypergradient` does
this itself), evaluation and the cosine head's class means (so ranks may run different numbers of forward passes),
and what is written to disk (checkpoints and weights hold full tensors, the same files as without FSDP, so a run
resumes with or without FSDP on any world size). What reads only the modulators (the scale warm-up's test, the
module-wise learning rates of the real step, gamma logs) gathers just them (:func:`metapeft.meta.fsdp.full_copies`,
:func:`metapeft.meta.fsdp.gather_full`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from metapeft.meta.fsdp import fsdp_modules


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> None:
    """``fully_shard`` every block of ``model.blocks`` (a timm ViT's; none otherwise) and then ``model`` itself over
    a 1-D mesh of the ``world_size`` ranks on ``device``'s type; in place."""
    mesh = init_device_mesh(device.type, (world_size,))
    blocks = getattr(model, "blocks", None)
    for block in blocks if isinstance(blocks, nn.Sequential | nn.ModuleList) else ():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def check_fsdp(model: nn.Module, fsdp: bool, world_size: int, device: torch.device) -> bool:
    """Whether the trainer runs ``model`` under FSDP2 (``fsdp`` asked for, or ``model`` already sharded); errors,
    before anything changes, for what it cannot run."""
    sharded = bool(fsdp_modules(model))
    if not (fsdp or sharded):
        return False
    if world_size == 1:
        raise ValueError("fsdp needs a process group of several ranks (torchrun --nproc_per_node N, N > 1); "
                         "on one process train without it")
    meshes = {p.device_mesh.device_type for p in model.parameters() if isinstance(p, DTensor)}
    if sharded and meshes != {device.type}:
        raise ValueError(f"the model is sharded on {sorted(meshes)} but the trainer runs on {device.type} "
                         f"(device): shard it on the trainer's device")
    return True


def cut_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor ``value`` laid out like ``like``: a ``DTensor`` ``like`` gets this rank's rows of ``value``
    (cut locally, every rank holding the same ``value``), in ``like``'s dtype; otherwise ``value`` itself."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.detach().to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def sharded_like(stored: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``stored`` (full tensors by name) laid out like ``targets`` (:func:`cut_like`), to copy into the sharded
    model."""
    return {name: cut_like(t, targets[name]) for name, t in stored.items()}


@torch.no_grad()
def copy_full_into(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """``params[i].copy_(values[i])`` with full ``values``: a ``DTensor`` parameter takes its rows."""
    for p, v in zip(params, values):
        p.copy_(cut_like(v, p))


def sharded_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer ``state_dict`` of full tensors with each per-parameter buffer of a ``DTensor`` parameter's shape
    cut to that parameter's layout (``load_state_dict`` then keeps the optimizer's state sharded)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def cut(value, p):
        fits = isinstance(value, torch.Tensor) and value.ndim and value.shape == p.shape
        return cut_like(value, p) if fits else value

    return {**state, "state": {index: {key: cut(value, params[int(index)]) for key, value in buffers.items()}
                               for index, buffers in state["state"].items()}}
