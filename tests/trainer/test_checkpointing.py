"""What a checkpoint continues: a resume refuses other data (other counts, another split seed, other images with the
same labels) or another frozen backbone, naming what differs; a mid-epoch resume is exact with DataLoader workers
and random augmentations (max diff 1.2e-4 with num_workers=2 before), whatever num_workers the resume uses."""

import random

import pytest
import torch

from metapeft.atomic_files import LoadError
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from tests.helpers.toy import LongTailedBlobs, TinyNet

COUNTS = [20, 12, 6, 4]


def quiet(output_dir, **kwargs) -> TrainerConfig:
    return TrainerConfig(**{"progress": False, "batch_size": 8, "epochs": 2, "classifier": "linear",
                            "output_dir": str(output_dir), **kwargs})


def stopped_at_step_2(run, data, model=None) -> None:
    MetaPEFTTrainer(model or TinyNet(), data, config=quiet(run)).fit(max_steps=2)


@pytest.mark.parametrize("other, message", [
    (lambda: LongTailedBlobs([20, 12, 6, 5]), r"train_set length: 42 in the checkpoint, 43 now; train_set labels"),
    (lambda: LongTailedBlobs(COUNTS, seed=2), r"train_set labels: \w+ in the checkpoint, \w+ now"),
    (lambda: LongTailedBlobs(COUNTS, noise=0.5), r"train_set content: sample\(s\) \[0, 21, 41\] differ"),
], ids=["counts", "seed", "images"])
def test_a_resume_on_other_data_is_refused_naming_what_differs(tmp_path, other, message):
    stopped_at_step_2(tmp_path, LongTailedBlobs(COUNTS))
    resumed = MetaPEFTTrainer(TinyNet(), other(), config=quiet(tmp_path, resume=True))
    before = {k: v.clone() for k, v in resumed.module.state_dict().items()}
    with pytest.raises(LoadError, match=f"checkpoint .*checkpoint.pt continues a different run: {message}"):
        resumed.fit()
    assert all(torch.equal(before[k], v) for k, v in resumed.module.state_dict().items())


def test_a_resume_onto_another_frozen_backbone_is_refused(tmp_path):
    stopped_at_step_2(tmp_path, LongTailedBlobs(COUNTS))
    torch.manual_seed(123)
    other = TinyNet()  # same shapes, other frozen weights
    with pytest.raises(LoadError, match=r"frozen weights: 4 tensor\(s\) differ \['l1.base.bias', 'l1.base.weight'"):
        MetaPEFTTrainer(other, LongTailedBlobs(COUNTS), config=quiet(tmp_path, resume=True)).fit()


def test_a_resume_on_the_same_data_and_backbone_continues(tmp_path):
    torch.manual_seed(0)
    stopped_at_step_2(tmp_path, LongTailedBlobs(COUNTS))
    torch.manual_seed(0)
    result = MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS), config=quiet(tmp_path, resume=True)).fit()
    assert result["global_step"] == 12


class Augmented(LongTailedBlobs):
    """Random augmentation from torch's and Python's generators, as torchvision and timm transforms draw it."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x + 0.3 * torch.randn_like(x) * random.random(), y


def final_state(run, workers: int, stop_at: int | None = None, resume_workers: int | None = None):
    torch.manual_seed(0)
    config = quiet(run, num_workers=workers, epochs=2, meta_interval=1)
    if stop_at is not None:
        MetaPEFTTrainer(TinyNet(), Augmented(COUNTS), config=config).fit(max_steps=stop_at)
        torch.manual_seed(0)
        config = quiet(run, num_workers=resume_workers, epochs=2, meta_interval=1, resume=True)
    trainer = MetaPEFTTrainer(TinyNet(), Augmented(COUNTS), config=config)
    trainer.fit()
    return trainer.model_state()


def test_a_mid_epoch_resume_with_workers_is_exact(tmp_path):
    whole = final_state(tmp_path / "whole", workers=2)
    resumed = final_state(tmp_path / "cut", workers=2, stop_at=3, resume_workers=2)
    other_workers = final_state(tmp_path / "other", workers=2, stop_at=3, resume_workers=0)
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name
        assert torch.equal(other_workers[name], tensor), name
