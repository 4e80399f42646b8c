"""The trainer takes torch.compile'd and DDP-wrapped models: the exact meta step runs on the eager module under the
compile wrapper, DDP's own gradient hooks are bypassed, and the result equals training the bare model."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from tests.helpers.toy import LongTailedBlobs, TinyNet

COUNTS = [20, 12, 6, 4]


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def trained(wrap, meta_mode="exact", meta_reuse_lookahead=True):
    torch.manual_seed(0)
    model = TinyNet(dtype=torch.float64)
    with torch.no_grad():
        for layer in (model.l1, model.l2):
            layer.lora_B.normal_()
    config = TrainerConfig(epochs=1, batch_size=16, meta_lr=0.05, progress=False, classifier="linear",
                           meta_mode=meta_mode, meta_reuse_lookahead=meta_reuse_lookahead)
    trainer = MetaPEFTTrainer(wrap(model), LongTailedBlobs(COUNTS), config=config)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("meta_mode, reuse", [("exact", True), ("exact", False), ("finite_difference", True)],
                         ids=["exact", "exact-recompute", "finite-difference"])
def test_compiled_model_trains_like_the_eager_one(meta_mode, reuse):
    eager = trained(lambda m: m, meta_mode, reuse)
    compiled = trained(lambda m: torch.compile(m, backend="aot_eager"), meta_mode, reuse)
    assert compiled.module is not compiled.model and compiled.outer_step == eager.outer_step > 0
    state, expected = compiled.model_state(), eager.model_state()
    assert state.keys() == expected.keys() and not any(k.startswith("_orig_mod") for k in state)
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-10, atol=1e-12, msg=key)


def test_ddp_wrapped_model_trains_like_the_bare_one(process_group):
    bare = trained(lambda m: m)
    wrapped = trained(lambda m: nn.parallel.DistributedDataParallel(m))
    assert not isinstance(wrapped.model, nn.parallel.DistributedDataParallel)
    for key, tensor in bare.model_state().items():
        torch.testing.assert_close(wrapped.model_state()[key], tensor, rtol=1e-10, atol=1e-12, msg=key)
    assert list(wrapped.gammas()) == ["l1", "l2"]
