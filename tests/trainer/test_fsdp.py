"""Training an FSDP2-sharded tiny timm ViT with metapeft LoRA under 2 gloo processes (float64) equals single-process
training on the same global batches: the trainer shards it (``fsdp=True``, exact meta steps with the scale warm-up,
finite differences at K = 2 with gradient clipping and a checkpoint resumed midway) or takes a model the user
sharded (module-wise learning rates); uneven and empty shards, evaluation, the cosine head's class-mean init,
checkpoints in the format of unsharded runs. What cannot work fails at construction with a clear error."""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import metapeft
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig, setup_distributed
from tests.helpers.distributed import assert_states_equal, gloo_results
from tests.helpers.toy import LongTailedBlobs

COUNTS = [20, 12, 8, 6]  # 46 samples: batches of 15, 15, 15 (shards 8/7) and 1 (an empty shard on rank 1)
RUNS = {"exact_warmup": {"meta_mode": "exact", "meta_warmup_steps": 2},
        "finite_difference_K2": {"meta_mode": "finite_difference", "meta_lookahead_steps": 2, "max_grad_norm": 0.5},
        "user_sharded_module_lr": {"classifier": "linear", "meta_module_lr": True}}
RESUME_AT = 3


class BlobImages(LongTailedBlobs):
    """:class:`LongTailedBlobs` as 3 x 8 x 8 float64 images."""

    def __init__(self, counts, seed: int = 1) -> None:
        super().__init__(counts, dim=3 * 8 * 8, seed=seed)

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x.reshape(3, 8, 8).double(), y


def vit() -> torch.nn.Module:
    """A tiny timm ViT (2 blocks, dim 24, 4 x 4 patches, 4 classes) in float64 with LoRA on every position."""
    import timm

    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, depth=2,
                              num_classes=4, embed_dim=24, num_heads=2).double()
    metapeft.inject(model, method="lora", rank=2)
    with torch.no_grad():
        for p in metapeft.peft_parameters(model):
            p.normal_(0, 0.3)
    return model


def config(**kwargs) -> TrainerConfig:
    # log_every=3: the log reads the clipped runs' gradient norms (a DTensor's under FSDP)
    return TrainerConfig(**{"epochs": 2, "batch_size": 15, "meta_batch_size": 9, "meta_interval": 2, "meta_lr": 0.05,
                            "progress": False, "meta_warmup_steps": 0, "log_every": 3, **kwargs})


def trainer_for(model=None, **kwargs) -> MetaPEFTTrainer:
    torch.manual_seed(0)
    return MetaPEFTTrainer(model or vit(), BlobImages(COUNTS), config=config(**kwargs))


def train(model=None, **kwargs):
    trainer = trainer_for(model, **kwargs)
    return trainer, trainer.fit(eval_set=BlobImages(COUNTS, seed=5))


def user_sharded(world_size: int) -> torch.nn.Module:
    model = vit()
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def construction_error(**kwargs) -> str:
    try:
        trainer_for(**kwargs)
    except ValueError as error:
        return str(error)
    return "no error"


def worker(rank: int, world_size: int, out_dir: str) -> None:
    assert setup_distributed() == (rank, world_size)
    out = {"errors": [construction_error(model=user_sharded(world_size))]}  # classifier cosine: a new head
    for name, kwargs in RUNS.items():
        model = user_sharded(world_size) if name.startswith("user_sharded") else None
        trainer, metrics = train(model, **({"fsdp": True} if model is None else {}), **kwargs)
        out[name] = {"state": trainer.model_state(), "metrics": metrics, "outer_step": trainer.outer_step}
    directory = os.path.join(out_dir, "resumed")
    trainer_for(fsdp=True, output_dir=directory, **RUNS["finite_difference_K2"]).fit(max_steps=RESUME_AT)
    resumed = trainer_for(fsdp=True, output_dir=directory, resume=True, **RUNS["finite_difference_K2"])
    resumed.fit()
    out["resumed"] = {"state": resumed.model_state(), "outer_step": resumed.outer_step}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    return gloo_results(worker, 2, out_dir), out_dir


@pytest.mark.parametrize("run", list(RUNS))
def test_fsdp2_training_equals_one_process(two_process_run, run):
    results, _ = two_process_run
    single, metrics = train(**RUNS[run])
    assert single.outer_step >= 4
    for rank, result in enumerate(results):
        assert result[run]["outer_step"] == single.outer_step
        assert_states_equal(result[run]["state"], single.model_state(), (run, rank))
        assert result[run]["metrics"]["accuracy"] == metrics["accuracy"]


def test_fsdp2_checkpoint_resumes_and_loads_unsharded(two_process_run):
    results, out_dir = two_process_run
    uninterrupted = train(**RUNS["finite_difference_K2"])[0]
    for rank, result in enumerate(results):
        assert result["resumed"]["outer_step"] == uninterrupted.outer_step
        assert_states_equal(result["resumed"]["state"], uninterrupted.model_state(), ("resumed", rank))
    # the FSDP run's checkpoint is an unsharded run's: one process resumes it
    single = trainer_for(output_dir=str(out_dir / "resumed"), resume=True, **RUNS["finite_difference_K2"])
    single.load_state(out_dir / "resumed" / "checkpoint.pt")
    assert_states_equal(single.model_state(), results[0]["resumed"]["state"], "1 process")


def test_fsdp2_setups_that_cannot_work_fail_at_construction(two_process_run):
    results, _ = two_process_run
    for result in results:
        (replaced_head,) = result["errors"]
        assert "already sharded by fully_shard" in replaced_head and "fsdp=True" in replaced_head


def test_fsdp_on_one_process_fails_at_construction():
    with pytest.raises(ValueError, match="fsdp needs a process group of several ranks"):
        trainer_for(fsdp=True)
