"""The cosine head's class-mean initialisation reads un-augmented (test-transform) training images, and the meta
sampling mode reaches the trainer's sampler. Oracle: class means of the backbone features computed directly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metapeft import MetaPEFTTrainer, TrainerConfig
from tests.helpers.toy import LongTailedBlobs, TinyNet

COUNTS = [20, 12, 6, 4]


class Jittered(torch.utils.data.Dataset):
    """``plain``'s items with random noise added at every read: a stand-in for training augmentation."""

    def __init__(self, plain: LongTailedBlobs) -> None:
        self.plain, self.targets = plain, plain.targets

    def __len__(self) -> int:
        return len(self.plain)

    def __getitem__(self, i: int):
        x, y = self.plain[i]
        return x + 3 * torch.randn_like(x), y


def class_mean_directions(model: TinyNet, data: LongTailedBlobs) -> torch.Tensor:
    """(C, hidden) float32: the normalised class-mean features of ``data``'s images."""
    with torch.no_grad():
        features, labels = model.features(data.x), torch.tensor(data.labels)
    return torch.stack([F.normalize(features[labels == c].mean(0), dim=0) for c in range(len(COUNTS))])


def test_class_means_come_from_the_unaugmented_training_images():
    plain = LongTailedBlobs(COUNTS)
    model = TinyNet()
    trainer = MetaPEFTTrainer(model, Jittered(plain), config=TrainerConfig(progress=False, batch_size=16),
                              head_init_set=plain)
    trainer.init_head_from_class_means()
    torch.testing.assert_close(model.head.weight.detach(), class_mean_directions(model, plain), rtol=0, atol=1e-6)


def test_without_a_head_init_set_the_training_set_is_used():
    plain = LongTailedBlobs(COUNTS)
    model = TinyNet()
    MetaPEFTTrainer(model, Jittered(plain), config=TrainerConfig(progress=False, batch_size=16)) \
        .init_head_from_class_means()
    gap = (model.head.weight.detach() - class_mean_directions(model, plain)).abs().max()
    assert gap > 1e-2  # noise of scale 3 moves the means: the plain set is what makes the test above pass


def test_head_init_set_must_hold_the_training_labels():
    with pytest.raises(ValueError, match="head_init_set"):
        MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS), config=TrainerConfig(progress=False),
                        head_init_set=LongTailedBlobs(COUNTS, seed=2))


@pytest.mark.parametrize("sampling", ["uniform", "class_balanced"])
def test_meta_sampling_reaches_the_sampler(sampling):
    trainer = MetaPEFTTrainer(TinyNet(), LongTailedBlobs(COUNTS),
                              config=TrainerConfig(progress=False, batch_size=16, meta_sampling=sampling))
    assert trainer.meta_sampler.sampling == sampling
    with pytest.raises(ValueError, match="meta_sampling must be one of"):
        TrainerConfig(meta_sampling="stratified")
