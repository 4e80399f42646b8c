"""HF PEFT both ways: from_peft turns PEFT LoRA layers into FusedMetaLoRA with the same logits (float64, PEFT's own
forward is the oracle), from a PeftModel or a saved adapter directory; export_peft -> from_peft round trip; refusals
name the layer and change nothing; a missing peft names the extra."""

import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import metapeft
from metapeft.inject import injection_config
from tests.helpers.vit import images, randomize, tiny_vit

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]  # "proj" alone would also hit patch_embed.proj (a Conv2d)


def base_vit(seed=1):
    return tiny_vit(seed, dtype=torch.float64).eval()


def peft_vit(seed=1, **options):
    """A PEFT LoRA ViT in float64 whose B and head are random (PEFT starts B at zero: the LoRA would add nothing)."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "modules_to_save": ["head"], **options}
    model = get_peft_model(base_vit(seed), LoraConfig(**config))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
    return model.eval()


def first_mismatch(a, b):
    index = (a - b).abs().argmax()
    return f"max |diff| {(a - b).abs().max():.3g} at flat index {index.item()}"


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "rank_pattern": {"blocks.1.attn.qkv": 2},
                                          "alpha_pattern": {"blocks.2.mlp.fc1": 3}}],
                         ids=["uniform", "rslora-patterns"])
def test_from_peft_model_keeps_the_logits_and_learns_gamma(options):
    peft_model, x = peft_vit(**options), images(3, torch.float64)
    with torch.no_grad():
        expected = peft_model(x)
    peft_layers = {name: (m.lora_A["default"].weight.detach().clone(), float(m.scaling["default"]))
                   for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    model = metapeft.from_peft(peft_model)
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12), first_mismatch(got, expected)
    fused = {name: m for name, m in model.named_modules() if isinstance(m, metapeft.FusedMetaLoRA)}
    assert set(fused) == set(peft_layers) and len(fused) == 12
    for name, module in fused.items():
        lora_A, scaling = peft_layers[name]
        assert torch.equal(module.lora_A, lora_A) and torch.equal(module.gamma, torch.ones(1, dtype=module.gamma.dtype))
        torch.testing.assert_close(module.scale().detach().double(), torch.tensor([scaling], dtype=torch.float64))
    assert not any("lora_" in type(m).__name__.lower() or "ModulesToSave" in type(m).__name__
                   for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{leaf}" for n in fused for leaf in ("lora_A", "lora_B", "modulator")} | {
        "head.weight", "head.bias"}
    model(x).sum().backward()
    assert all(m.modulator.grad is not None and m.modulator.grad.abs().sum() > 0 for m in fused.values())
    assert injection_config(model).target_modules == tuple(fused)


def test_from_a_peft_adapter_directory(tmp_path):
    peft_model, x = peft_vit(seed=2), images(2, torch.float64)
    with torch.no_grad():
        expected = peft_model(x)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = metapeft.from_peft(base_vit(seed=2), tmp_path / "adapter")
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12), first_mismatch(got, expected)
    assert metapeft.gamma_table(model).values.shape == (12, 1)


def test_export_then_import_and_save_load_of_the_imported_model(tmp_path):
    model, x = base_vit(seed=3), images(2, torch.float64)
    metapeft.inject(model, positions=("out", "mlp1", "mlp2"), rank=3, alpha=6.0)  # no qkv: one PEFT rank
    randomize(model)
    with torch.no_grad():
        expected = model(x)
    imported = metapeft.from_peft(base_vit(seed=3), metapeft.export_peft(model, tmp_path / "peft"))
    with torch.no_grad():
        got = imported(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12), first_mismatch(got, expected)
    path = metapeft.save_adapter(imported, tmp_path / "a.safetensors")  # one rank: a fresh base model loads it
    fresh = base_vit(seed=3)
    metapeft.load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), imported(x))


@pytest.mark.parametrize("options, match", [
    ({"use_dora": True}, "'blocks.0.attn.qkv' has a LoRA variant such as DoRA"),
    ({"target_modules": ["patch_embed.proj", "attn.qkv"]}, r"only PEFT LoRA Linear layers convert; found \['patch"),
    ({"lora_bias": True}, "a bias on lora_B"),
], ids=["dora", "conv", "lora-bias"])
def test_refusals_name_the_layer_and_change_nothing(options, match):
    peft_model = peft_vit(**options)
    before = {n: type(m) for n, m in peft_model.named_modules()}
    with pytest.raises(ValueError, match=match):
        metapeft.from_peft(peft_model)
    assert {n: type(m) for n, m in peft_model.named_modules()} == before


def test_a_model_without_lora_and_a_missing_peft_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="holds no PEFT LoRA layers"):
        metapeft.from_peft(nn.Sequential(nn.Linear(3, 3)))
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "metapeft\[peft\]"'):
        metapeft.from_peft(nn.Sequential(nn.Linear(3, 3)))
    model = tiny_vit(depth=1)
    metapeft.inject(model, rank=2, modules_to_save=[])
    with pytest.raises(ImportError, match=r"metapeft\[peft\]"):
        metapeft.export_peft(model, "unused")


def test_export_peft_is_still_reachable_from_the_package_root():
    import metapeft.hf_peft

    assert metapeft.export_peft is metapeft.hf_peft.export_peft and metapeft.from_peft is metapeft.hf_peft.from_peft
