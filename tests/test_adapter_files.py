"""Adapter files describe themselves (versions, injection, heads, gamma, class names), load all-or-nothing into a
fresh model (restoring the trainer's cosine head), refuse damaged files naming them; export_peft and merge refuse
what they cannot represent; compiled and DDP-wrapped models are accepted."""

import json
import os
import random

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

import metapeft
from metapeft.adapter_files import adapter_tensors, read_adapter_info
from metapeft.atomic_files import LoadError
from metapeft.heads import CosineClassifier, replace_head
from metapeft.inject import CONFIG_ATTRIBUTE, peft_modules
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from tests.helpers.vit import images, randomize, tiny_vit

CLASSES = ["cat", "dog", "owl", "yak"]


def injected(seed=1, **kwargs):
    model = tiny_vit(seed)
    metapeft.inject(model, **{"positions": ("q", "v", "out", "mlp1"), "layers": [0, 2], "rank": 3, **kwargs})
    randomize(model)
    return model


def with_cosine_head(model, classes=4, scale=17.0):
    head = CosineClassifier(48, classes, scale)
    head.weight.data.normal_()
    replace_head(model, "head", head)
    return model


def trained_by_default_trainer():
    """A tiny ViT after one epoch of the default trainer (cosine head, MetaPEFT) on 10 images of 5 classes."""
    model = tiny_vit()
    metapeft.inject(model, positions=("q", "v"), rank=2)
    data = [(image, i % 5) for i, image in enumerate(images(10))]
    MetaPEFTTrainer(model, data, config=TrainerConfig(epochs=1, batch_size=5, progress=False)).fit()
    return model.eval()


def test_adapter_file_describes_itself(tmp_path):
    model = with_cosine_head(injected(alpha=6.0))
    path = metapeft.save_adapter(model, tmp_path / "a.safetensors", class_names=CLASSES)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    versions = json.loads(metadata["versions"])
    assert versions == {"metapeft": metapeft.__version__, "torch": torch.__version__}
    info = read_adapter_info(path)
    assert info.config.method == "lora" and info.config.alpha == 6.0
    assert [p.module for p in info.config.placements] == ["blocks.0.attn.qkv", "blocks.0.attn.proj",
                                                          "blocks.0.mlp.fc1", "blocks.2.attn.qkv",
                                                          "blocks.2.attn.proj", "blocks.2.mlp.fc1"]
    assert info.heads == {"head": {"type": "CosineClassifier", "in_features": 48, "num_classes": 4, "scale": 17.0}}
    assert info.class_names == tuple(CLASSES)
    for name, module in peft_modules(model):
        expected = torch.nn.functional.softplus(module.modulator.detach()).tolist()
        assert info.gamma[name] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="class_names has 3 names but the head"):
        metapeft.save_adapter(model, tmp_path / "b.safetensors", class_names=CLASSES[:3])


def test_default_trainer_adapter_loads_into_a_fresh_model_with_its_head(tmp_path):
    model = trained_by_default_trainer()
    assert isinstance(model.head, CosineClassifier)
    path = metapeft.save_adapter(model, tmp_path / "a.safetensors")
    fresh = tiny_vit()
    assert isinstance(fresh.head, nn.Linear) and fresh.head.out_features == 5
    metapeft.load_adapter(fresh, path)
    assert isinstance(fresh.head, CosineClassifier) and fresh.head.num_classes == 5 and fresh.head.scale == 25.0
    assert fresh.head.weight.requires_grad
    x = images(3)
    assert torch.equal(fresh.eval()(x), model(x))


def test_export_peft_refuses_the_cosine_head_naming_it(tmp_path):
    model = trained_by_default_trainer()
    with pytest.raises(ValueError, match="'head' is a metapeft CosineClassifier .* HF PEFT cannot represent"):
        metapeft.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_linear_head_is_rebuilt_to_the_file_size_and_peft_export_reproduces_logits(tmp_path):
    from peft import PeftModel

    model = injected()
    replace_head(model, "head", nn.Linear(48, 3))
    path = metapeft.save_adapter(model, tmp_path / "a.safetensors")
    fresh = tiny_vit()
    metapeft.load_adapter(fresh, path)
    x = images(3)
    assert fresh.head.out_features == 3 and torch.equal(fresh.eval()(x), model.eval()(x))
    base = tiny_vit()
    replace_head(base, "head", nn.Linear(48, 3))
    loaded = PeftModel.from_pretrained(base, metapeft.export_peft(model, tmp_path / "peft")).eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "adaptformer"])
def test_channel_gamma_file_records_its_granularity_and_loads_only_into_its_kind(tmp_path, method):
    """gamma="channel": the file's injection says so, a fresh model loads it to the same outputs, a model injected
    with one gamma per module is refused naming the field; the gamma metadata holds every channel's gamma."""
    model = injected(method=method, gamma="channel", **({"positions": None} if method != "lora" else {}))
    path = metapeft.save_adapter(model, tmp_path / "a.safetensors")
    info = read_adapter_info(path)
    assert info.config.gamma == "channel"
    for name, module in peft_modules(model):
        assert len(info.gamma[name]) == module.modulator.numel() > 1
    fresh = tiny_vit()
    metapeft.load_adapter(fresh, path)
    x = images(2)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    scalar = injected(method=method, **({"positions": None} if method != "lora" else {}))
    with pytest.raises(LoadError, match="gamma: 'scalar' != 'channel'"):
        metapeft.load_adapter(scalar, path)


def test_peft_export_folds_per_channel_gamma_into_b_and_reproduces_logits(tmp_path):
    from peft import PeftModel

    model = injected(gamma="channel", alpha=6.0)  # q, v of a fused qkv, out, mlp1: one gamma per output row
    with torch.no_grad():
        for _, module in peft_modules(model):
            module.modulator.uniform_(-2.0, 2.0)
    replace_head(model, "head", nn.Linear(48, 3))
    base = tiny_vit()
    replace_head(base, "head", nn.Linear(48, 3))
    loaded = PeftModel.from_pretrained(base, metapeft.export_peft(model, tmp_path / "peft")).eval()
    x = images(3)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, type(model.head)


def assert_unchanged(model, before):
    state, head_type = before
    assert getattr(model, CONFIG_ATTRIBUTE, None) is None and not peft_modules(model)
    assert type(model.head) is head_type and model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_failing_load_leaves_a_fresh_model_untouched(tmp_path):
    path = metapeft.save_adapter(with_cosine_head(injected()), tmp_path / "a.safetensors")
    wider = tiny_vit(embed_dim=60)
    before = snapshot(wider)
    with pytest.raises(LoadError, match=r"blocks.0.attn.qkv.lora_A: file shape \(6, 48\) != model shape \(6, 60\)"):
        metapeft.load_adapter(wider, path)
    assert_unchanged(wider, before)


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "flipped"])
def test_damaged_adapter_files_are_refused_naming_the_file(tmp_path, how):
    model = injected()
    path = tmp_path / "a.safetensors"
    metapeft.save_adapter(model, path)
    data = bytearray(path.read_bytes())
    if how == "flipped":
        at = data.find(model.blocks[0].attn.qkv.lora_A.detach().numpy().tobytes())
        data[at + 5] ^= 0x01
    else:
        data = {"truncated": data[: len(data) - 40], "empty": b"", "random": random.Random(0).randbytes(len(data))}[how]
    path.write_bytes(bytes(data))
    fresh = tiny_vit()
    before = snapshot(fresh)
    with pytest.raises(LoadError) as error:
        metapeft.load_adapter(fresh, path)
    assert str(error.value).startswith(str(path))
    assert ("checksum mismatch" if how == "flipped" else "not a readable safetensors") in str(error.value)
    assert_unchanged(fresh, before)


def test_merge_refuses_a_non_finite_gamma_and_leaves_base_weights(tmp_path):
    model = injected()
    with torch.no_grad():
        model.blocks[2].attn.qkv.modulator[1] = float("nan")
    weights = {name: m.base.weight.clone() for name, m in peft_modules(model)}
    with pytest.raises(ValueError, match=r"non-finite gamma or LoRA weights in 1 module\(s\) \['blocks.2.attn.qkv'\]"):
        metapeft.merge(model)
    assert all(torch.equal(m.base.weight, weights[name]) and not m.merged for name, m in peft_modules(model))
    with pytest.raises(ValueError, match="refusing to write"):
        metapeft.save_adapter(model, tmp_path / "a.safetensors")
    assert not os.listdir(tmp_path)


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "compile", "compiled_ddp"])
def test_wrapped_models_are_accepted(tmp_path, process_group, wrap):
    model = injected()
    wrapped = {"ddp": lambda m: nn.parallel.DistributedDataParallel(m),
               "compile": lambda m: torch.compile(m),
               "compiled_ddp": lambda m: torch.compile(nn.parallel.DistributedDataParallel(m))}[wrap](model)
    path = metapeft.save_adapter(wrapped, tmp_path / "a.safetensors")
    assert metapeft.gamma_table(wrapped).values.shape == (3, 6)
    fresh = {"ddp": lambda m: nn.parallel.DistributedDataParallel(m), "compile": lambda m: m,
             "compiled_ddp": lambda m: nn.parallel.DistributedDataParallel(m)}[wrap](tiny_vit())
    metapeft.load_adapter(fresh, path)
    for key, tensor in adapter_tensors(model).items():
        assert torch.equal(adapter_tensors(fresh)[key], tensor), key
    assert metapeft.merge(wrapped) == 6
