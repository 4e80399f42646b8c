"""The hypergradient of an FSDP2-sharded model (``fully_shard`` on every block and the root of a tiny timm ViT with
metapeft LoRA, 2 gloo processes) equals the single-process hypergradient on the global batches, in float64: every
mode, K = 1, 2 and 3, momentum buffers given as the sharded optimizer's DTensors, weight decay, module-wise learning
rates (a callable), the AdamW inner rule with a sharded state, a mixed-precision policy (not applied in the meta
step), HSDP meshes, uneven shards of batches, of the head and of the (S,) modulators (one rank holds no row of a (1,)
modulator), per-channel (N,) modulators; called on a fresh model, after a forward (FSDP's root stays unsharded) and
after a forward/backward. The model comes back as it was, and plain FSDP training goes on. What cannot work fails
with a clear error first."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import metapeft
from metapeft.data.sampling import shard_bounds
from metapeft.meta import trainable_phi
from metapeft.meta.inner import AdamWRule, AdamWState
from metapeft.params import meta_parameters, module_lr_scales
from tests.helpers.distributed import run_gloo
from tests.helpers.meta import relative_error

LR, MOMENTUM, WEIGHT_DECAY = 0.2, 0.9, 0.05
TRAIN_SIZES, VAL_SIZE = (5, 4, 3), 5  # shards 3/2, 2/2, 2/1 and 3/2 on 2 ranks
# (mode, K, setup). Setups: "fresh" (no forward yet), "forward" (the root left unsharded), "backward" (after a
# training step), "lr_scaled" (after a forward, module-wise learning rates), "adamw" (AdamWRule, its state the sharded
# optimizer's DTensors), "mixed_precision" (float32 compute in FSDP's own passes; the meta step runs at the parameters'
# float64), "hsdp_2x1" / "hsdp_1x2" (HSDP's (replicate, shard) mesh, 2 replicas of 1 shard / 1 replica of 2 shards),
# "channel" (per-channel gamma: (N,) modulators sharded by rows)
CASES = [("exact", 1, "fresh"), ("exact", 3, "lr_scaled"), ("finite_difference", 1, "backward"),
         ("finite_difference", 3, "fresh"), ("first_order", 1, "lr_scaled"), ("first_order", 3, "backward"),
         ("exact", 2, "adamw"), ("first_order", 2, "mixed_precision"), ("exact", 1, "hsdp_2x1"),
         ("finite_difference", 2, "hsdp_1x2"), ("exact", 2, "channel")]


def lora_vit(setup: str = "fresh") -> torch.nn.Module:
    """A tiny timm ViT (2 blocks, dim 48, 5 classes) in float64 with LoRA on every position (q, k, v: S = 3; with
    ``setup="channel"`` a gamma per output channel) and random LoRA B, modulators and head; the same on every
    rank."""
    import timm  # imported by the workers and the test only

    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                              num_classes=5, embed_dim=48, num_heads=3).double()
    metapeft.inject(model, method="lora", rank=2, positions=("q", "v", "out", "mlp1", "mlp2"),
                    gamma="channel" if setup == "channel" else "scalar")
    with torch.no_grad():
        for p in metapeft.peft_parameters(model) + meta_parameters(model) + list(model.head.parameters()):
            p.normal_(0, 0.3)
    return model


def problem():
    """(global train batches, global val batch, momentum buffers): the same on every rank."""
    torch.manual_seed(8)
    batch = lambda n: (torch.randn(n, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (n,)))  # noqa: E731
    return [batch(n) for n in TRAIN_SIZES], batch(VAL_SIZE), [torch.randn_like(p) for p in trainable_phi(lora_vit())]


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def call(model, train, val, buffers, mode: str, steps: int, setup: str):
    """The hypergradient of a case; ``buffers``: one momentum buffer per phi parameter (SGD)."""
    if setup == "adamw":
        state = [AdamWState(m, m.abs(), 3.0) for m in buffers]
        return metapeft.hypergradient(model, loss_fn, train[0], val, inner_rule=AdamWRule(LR, weight_decay=0.01),
                                      inner_state=state, mode=mode, lookahead_batches=train[1:steps])
    return metapeft.hypergradient(model, loss_fn, train[0], val, lr=LR, momentum=MOMENTUM, momentum_buffers=buffers,
                                  weight_decay=WEIGHT_DECAY, mode=mode, lookahead_batches=train[1:steps],
                                  lr_scales=module_lr_scales if setup == "lr_scaled" else None)


def single_process(mode: str, steps: int, setup: str) -> list:
    train, val, buffers = problem()
    r = call(lora_vit(setup), train, val, buffers, mode, steps, setup)
    return [r.meta_grads, r.lookahead, r.phi_grads, [r.train_loss], [r.val_loss]]


def sharded_vit(world_size: int, setup: str = "fresh"):
    """:func:`lora_vit` with ``fully_shard`` on every block and the root, on the mesh and policy of ``setup``."""
    if setup.startswith("hsdp"):
        shape = (world_size, 1) if setup == "hsdp_2x1" else (1, world_size)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world_size,))
    policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32)} if setup == "mixed_precision" else {}
    model = lora_vit(setup)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, **policy)
    return fully_shard(model, mesh=mesh, **policy)


def shard(batch, rank: int, world_size: int):
    start, stop = shard_bounds(len(batch[1]), rank, world_size)
    return batch[0][start:stop], batch[1][start:stop]


def full(tensors):
    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


def error_of(fn) -> str:
    try:
        fn()
    except ValueError as error:
        return str(error)
    return "no error"


def worker(rank: int, world_size: int, out_path: str) -> None:
    train, val, buffers = problem()
    train, val = [shard(b, rank, world_size) for b in train], shard(val, rank, world_size)
    out = {"cases": {}}
    for mode, steps, setup in CASES:
        model = sharded_vit(world_size, setup)
        sharded_buffers = [distribute_tensor(b, p.device_mesh, p.placements, src_data_rank=None)
                           for b, p in zip(buffers, trainable_phi(model))]
        if setup in ("lr_scaled", "backward"):
            loss = loss_fn(model, train[0])
            if setup == "backward":
                loss.backward()
        state = {name: full([p])[0].detach().clone() for name, p in model.named_parameters()}
        r = call(model, train, val, sharded_buffers, mode, steps, setup)
        after = dict(model.named_parameters())
        out["cases"][(mode, steps, setup)] = {
            "results": [full(r.meta_grads), full(r.lookahead), full(r.phi_grads), [r.train_loss], [r.val_loss]],
            "sharded": all(isinstance(t, DTensor) for t in r.meta_grads + r.lookahead + r.phi_grads),
            "unchanged": after.keys() == state.keys() and all(
                isinstance(p, DTensor) and torch.equal(p.full_tensor(), state[n]) for n, p in after.items())}
    # plain FSDP training goes on after a meta step: a forward/backward on even shards (2 + 2 rows) gives the
    # global mean's gradient, reduce-scattered by FSDP
    model = sharded_vit(world_size)
    call(model, train, val, None, "exact", 1, "fresh")
    loss_fn(model, shard(problem()[0][1], rank, world_size)).backward()
    out["training_grads"] = [p.grad.full_tensor() for p in trainable_phi(model)]
    out["errors"] = [error_of(lambda: metapeft.hypergradient(
        model, loss_fn, train[0], val, lr=LR, lr_scales=[torch.ones_like(p) for p in trainable_phi(model)]))]
    dist.barrier()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, out)
    if rank == 0:
        torch.save(gathered, out_path)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("fsdp") / "out.pt")
    run_gloo(worker, 2, out_path)
    return torch.load(out_path, weights_only=False)


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_fsdp2_hypergradient_equals_single_process(two_ranks, case):
    expected = single_process(*case)
    for rank, out in enumerate(two_ranks):
        got = out["cases"][case]
        assert got["sharded"] and got["unchanged"], (case, rank)
        for name, actual, oracle in zip(("meta_grads", "lookahead", "phi_grads", "train_loss", "val_loss"),
                                        got["results"], expected):
            # float64; only the order of the sums differs from the single process
            assert relative_error(actual, oracle) < 1e-12, (case, rank, name, relative_error(actual, oracle))


def test_fsdp2_training_goes_on_and_unsupported_setups_fail_clearly(two_ranks):
    train, _, _ = problem()
    model = lora_vit()
    loss_fn(model, train[1]).backward()
    for out in two_ranks:
        assert relative_error(out["training_grads"], [p.grad for p in trainable_phi(model)]) < 1e-12
        (lr_scale_tensors,) = out["errors"]
        assert "lr_scales on an FSDP2 model must not hold DTensors" in lr_scale_tensors
