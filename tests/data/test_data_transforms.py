"""The paper's transforms: output shapes and normalisation, per-backbone mean / std."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from metapeft.data import backbone_normalization, build_transforms
from metapeft.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("size", [(320, 200), (50, 90)], ids=["landscape", "small-portrait"])
def test_output_shape_224(train, size):
    image = Image.new("RGB", size, (10, 200, 30))
    out = build_transforms(train, 224)(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_test_transform_normalises_with_the_given_mean_std():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    out = build_transforms(False, 32, mean, std)(Image.new("RGB", (40, 40), (255, 0, 51)))
    expected = [(1.0 - 0.5) / 0.2, (0.0 - 0.4) / 0.25, (0.2 - 0.3) / 0.5]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(out[channel], torch.full((32, 32), value), atol=1e-5, rtol=0)


def test_test_transform_is_resize_then_center_crop():
    # 512x256 black image with a white vertical band 112 px wide in the middle. Resize(256) keeps it as is and the
    # 224 center crop is half white; Resize(448) scales by 1.75, so the band (196 px) fills 7/8 of the crop.
    image = Image.new("RGB", (512, 256), (0, 0, 0))
    image.paste((255, 255, 255), (256 - 56, 0, 256 + 56, 256))
    out = build_transforms(False, 224, (0, 0, 0), (1, 1, 1))(image)
    assert out.shape == (3, 224, 224) and float(out.mean()) == pytest.approx(0.5, abs=0.01)
    out = build_transforms(False, 224, (0, 0, 0), (1, 1, 1), resize=448)(image)
    assert float(out.mean()) == pytest.approx(0.875, abs=0.01)


def test_train_transform_is_random():
    image = Image.effect_noise((64, 64), 80).convert("RGB")
    transform = build_transforms(True, 32)
    torch.manual_seed(0)
    first = transform(image)
    assert not torch.equal(first, transform(image))
    torch.manual_seed(0)
    assert torch.equal(first, transform(image))


def test_backbone_normalization():
    assert backbone_normalization("vit_base_patch16_clip_224.openai")[0] == pytest.approx((0.4815, 0.4578, 0.4082),
                                                                                          abs=1e-4)
    assert backbone_normalization("vit_base_patch16_224.augreg_in21k") == ((0.5,) * 3, (0.5,) * 3)
    assert backbone_normalization("not_a_model") == (IMAGENET_MEAN, IMAGENET_STD)
    assert backbone_normalization(torch.nn.Linear(1, 1)) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 0}, "image_size must be a positive int"),
    ({"mean": (0.5, 0.5)}, "3 entries"),
    ({"image_size": 224, "resize": 200}, "resize"),
], ids=["size", "mean", "resize"])
def test_build_transforms_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_transforms(False, **kwargs)
