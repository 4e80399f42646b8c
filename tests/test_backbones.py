"""SatMAE pre-training checkpoints into timm ViTs (``metapeft.backbones``), on synthetic checkpoints written in
SatMAE's key layout at small depth and width. Oracle: the timm model whose encoder tensors were written."""

from __future__ import annotations

import argparse
import random

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

from metapeft.backbones import SATMAE_MEAN, SATMAE_STD, load_satmae_weights, read_satmae_checkpoint, satmae_to_timm
from metapeft.cli import main
from metapeft.runs.builders import build_backbone, build_data
from metapeft.runs.directory import load_run
from tests.helpers.cli import tiny_config
from tests.helpers.imagefiles import write_index_dataset

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32}  # ViT-L/16's layout, shrunk; grid 2 x 2


def vit_large(**kwargs) -> torch.nn.Module:
    return timm.create_model("vit_large_patch16_224", pretrained=False, **{**SMALL, **kwargs})


def satmae_state(encoder: torch.nn.Module, decoder_dim: int = 32) -> dict[str, torch.Tensor]:
    """SatMAE's MaskedAutoencoderViT keys: timm's encoder keys without the head, plus mask token and decoder."""
    state = {k: v.clone() for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    dim, tokens = encoder.embed_dim, encoder.pos_embed.shape[1]
    block = timm.models.vision_transformer.Block(decoder_dim, num_heads=2, qkv_bias=True)
    state |= {"mask_token": torch.zeros(1, 1, dim), "decoder_embed.weight": torch.randn(decoder_dim, dim),
              "decoder_embed.bias": torch.zeros(decoder_dim), "decoder_pos_embed": torch.randn(1, tokens, decoder_dim),
              "decoder_norm.weight": torch.ones(decoder_dim), "decoder_norm.bias": torch.zeros(decoder_dim),
              "decoder_pred.weight": torch.randn(16 * 16 * 3, decoder_dim), "decoder_pred.bias": torch.zeros(768)}
    state |= {f"decoder_blocks.0.{k}": v for k, v in block.state_dict().items()}
    return state


def write_checkpoint(path, state) -> str:
    """The file layout of SatMAE's releases: model, optimizer-free extras, and the training args namespace."""
    torch.save({"model": state, "epoch": 799, "args": argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75,
                                                                         input_size=224)}, path)
    return str(path)


@pytest.fixture
def encoder() -> torch.nn.Module:
    torch.manual_seed(3)
    model = vit_large(num_classes=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_a_satmae_checkpoint_loads_into_timm_vit_large(encoder, tmp_path):
    path = write_checkpoint(tmp_path / "fmow_pretrain.pth", satmae_state(encoder))
    model = vit_large(num_classes=4).eval()
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert load_satmae_weights(model, path) is model
    for key, tensor in encoder.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head_before.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), encoder.forward_features(x))


def test_norm_becomes_fc_norm_in_an_average_pooling_model(encoder):
    model = vit_large(num_classes=4, global_pool="avg")
    converted = satmae_to_timm(satmae_state(encoder), model)
    assert "norm.weight" not in converted and torch.equal(converted["fc_norm.weight"], encoder.norm.weight)
    model.load_state_dict(converted, strict=False)
    assert torch.equal(model.fc_norm.bias, encoder.norm.bias)


def test_pos_embed_is_resampled_to_another_grid(encoder):
    model = vit_large(num_classes=4, img_size=48)  # grid 3 x 3 instead of 2 x 2
    converted = satmae_to_timm(satmae_state(encoder), model)
    old = encoder.pos_embed.detach()
    assert converted["pos_embed"].shape == (1, 10, 64) and torch.equal(converted["pos_embed"][:, :1], old[:, :1])
    grid = old[:, 1:].reshape(1, 2, 2, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True)  # timm's resampling mode
    expected = expected.permute(0, 2, 3, 1).reshape(1, 9, 64)
    torch.testing.assert_close(converted["pos_embed"][:, 1:], expected)


@pytest.mark.parametrize("change, named", [
    (lambda s: s.update({"blocks.0.attn.q_bias": torch.zeros(64)}), "unexpected keys ['blocks.0.attn.q_bias']"),
    (lambda s: s.pop("blocks.1.mlp.fc2.weight"), "missing keys ['blocks.1.mlp.fc2.weight']"),
    (lambda s: s.update({"pos_embed": torch.zeros(1, 5, 48)}), "pos_embed: checkpoint (1, 5, 48), model (1, 5, 64)"),
    (lambda s: s.update({"blocks.0.attn.qkv.weight": torch.zeros(3, 64)}), "blocks.0.attn.qkv.weight: checkpoint"),
], ids=["unexpected", "missing", "pos-embed-width", "shape"])
def test_every_other_difference_is_an_error_naming_the_key(encoder, tmp_path, change, named):
    state = satmae_state(encoder)
    change(state)
    path = write_checkpoint(tmp_path / "bad.pth", state)
    model = vit_large(num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"SatMAE checkpoint .*bad\.pth: the SatMAE checkpoint does not fit") as error:
        load_satmae_weights(model, path)
    assert named in str(error.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded


def test_checkpoint_files_that_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_satmae_checkpoint(tmp_path / "missing.pth")
    torch.save({"model": {"step": 3}}, tmp_path / "no_tensors.pth")
    with pytest.raises(ValueError, match="expected a 'model' state dict of tensors"):
        read_satmae_checkpoint(tmp_path / "no_tensors.pth")
    torch.save({"model": {"w": torch.zeros(1)}, "rng": random.Random(0)}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match=r"code\.pth: refused: .*random\.Random") as error:
        read_satmae_checkpoint(tmp_path / "code.pth")
    assert "weights_only" not in str(error.value)


def test_build_backbone_reads_the_satmae_layout_and_requires_the_file(encoder, tmp_path):
    path = write_checkpoint(tmp_path / "fmow_pretrain.pth", satmae_state(encoder))
    config = {"name": "vit_large_patch16_224", "pretrained": False, "weights_format": "satmae", "kwargs": SMALL}
    model = build_backbone({**config, "weights": path}, 4)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, encoder.blocks[1].mlp.fc2.weight)
    with pytest.raises(ValueError, match="weights_format='satmae'.*set model.weights to it"):
        build_backbone(config, 4)
    with pytest.raises(ValueError, match=r"model.weights_format must be one of \('timm', 'satmae'\), got 'mae'"):
        build_backbone({**config, "weights": path, "weights_format": "mae"}, 4)


@pytest.fixture
def one_thread():
    """A tiny model trains several times faster on one thread than on the shared machine's oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_metapeft_train_with_satmae_weights(encoder, tmp_path, capsys, one_thread):
    data = write_index_dataset(tmp_path / "fusrs", {"train": [6, 4, 3, 3], "test": [2] * 4}, size=32)
    path = write_checkpoint(tmp_path / "fmow_pretrain.pth", satmae_state(encoder))
    config = tiny_config(data, tmp_path / "run", epochs=1)
    config["model"] = {"name": "vit_large_patch16_224", "pretrained": False, "weights_format": "satmae",
                       "kwargs": SMALL}
    config["data"] |= {"split": "fusrs_v2.5", "image_size": 32, "resize": 36}
    (tmp_path / "fusrs.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "fusrs.yaml")]) == 2
    assert "set model.weights to it (e.g. fmow_pretrain.pth)" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "fusrs.yaml"), "--weights", path]) == 0
    _, model, _ = load_run(tmp_path / "run")
    assert torch.equal(model.pos_embed, encoder.pos_embed) and torch.equal(model.norm.weight, encoder.norm.weight)
    normalize = build_data(config, ".").test.transform.transforms[-1]
    assert (tuple(normalize.mean), tuple(normalize.std)) == (SATMAE_MEAN, SATMAE_STD)  # fMoW-RGB, not ImageNet
