"""save_adapter / load_adapter round trips, refusals, atomic writes; export_peft reproduced by HF PEFT."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import metapeft
import metapeft.adapter_files
import metapeft.atomic_files
import metapeft.hf_peft
from tests.helpers.vit import images, randomize, tiny_vit


def injected(seed=1, **kwargs):
    model = tiny_vit(seed)
    metapeft.inject(model, **{"positions": ("q", "v", "out", "mlp1"), "layers": [0, 2], "rank": 3, **kwargs})
    randomize(model)
    return model


@pytest.mark.parametrize("meta", [True, False], ids=["meta", "fixed"])
def test_round_trip_is_exact_into_a_fresh_model(tmp_path, meta):
    model, x = injected(meta=meta, alpha=6.0), images()
    path = metapeft.save_adapter(model, tmp_path / "adapter.safetensors")
    with safe_open(path, framework="pt") as handle:
        config = json.loads(handle.metadata()["metapeft_config"])
        keys = set(handle.keys())
    assert config["rank"] == 3 and config["positions"] == ["q", "v", "out", "mlp1"] and config["meta"] == meta
    assert "blocks.2.attn.qkv.modulator" in keys and "head.weight" in keys
    assert not any("base" in k for k in keys)
    fresh = tiny_vit()  # the same frozen base weights; head and PEFT weights come from the file
    assert not torch.equal(fresh.head.weight, model.head.weight)
    metapeft.load_adapter(fresh, path)
    for key, tensor in metapeft.adapter_files.adapter_tensors(model).items():
        assert torch.equal(metapeft.adapter_files.adapter_tensors(fresh)[key], tensor), key
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("method", ["adaptformer", "adapter"])
def test_adapter_round_trip_and_no_peft_export(tmp_path, method):
    model = tiny_vit()
    metapeft.inject(model, method=method, layers=[1], rank=4)
    randomize(model)
    path = metapeft.save_adapter(model, tmp_path / "a.safetensors")
    fresh = tiny_vit()
    metapeft.load_adapter(fresh, path)
    x = images()
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="export_peft exports LoRA"):
        metapeft.export_peft(model, tmp_path / "peft")


def test_load_into_an_injected_model_and_runtime_fields_may_differ(tmp_path):
    model = injected()
    path = metapeft.save_adapter(model, tmp_path / "a.safetensors")
    other = tiny_vit()
    metapeft.inject(other, positions=("q", "v", "out", "mlp1"), layers=[0, 2], rank=3, dropout=0.1,
                    backend="torch")
    metapeft.load_adapter(other, path)
    other.eval()
    x = images()
    assert torch.equal(other(x), model(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"rank": 2}, "rank: 2 != 3"), ({"layers": [0, 1]}, "layers"), ({"positions": ("q", "out")}, "positions"),
     ({"meta": False}, "meta"), ({"alpha": 1.0}, "alpha")],
)
def test_config_mismatch_is_refused_with_the_difference(tmp_path, kwargs, match):
    path = metapeft.save_adapter(injected(), tmp_path / "a.safetensors")
    other = tiny_vit()
    metapeft.inject(other, **{"positions": ("q", "v", "out", "mlp1"), "layers": [0, 2], "rank": 3, **kwargs})
    before = {k: t.clone() for k, t in metapeft.adapter_files.adapter_tensors(other).items()}
    with pytest.raises(ValueError, match=match):
        metapeft.load_adapter(other, path)
    assert all(torch.equal(before[k], t) for k, t in metapeft.adapter_files.adapter_tensors(other).items())


def test_shape_mismatch_and_foreign_files_are_refused(tmp_path):
    path = metapeft.save_adapter(injected(), tmp_path / "a.safetensors")
    wider = tiny_vit(embed_dim=60)
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.lora_A: file shape \(6, 48\) != model shape \(6, 60\)"):
        metapeft.load_adapter(wider, path)
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a metapeft adapter file"):
        metapeft.load_adapter(tiny_vit(), tmp_path / "plain.safetensors")


def test_merged_model_refuses_load_and_export(tmp_path):
    model = injected()
    path = metapeft.save_adapter(model, tmp_path / "a.safetensors")
    metapeft.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        metapeft.load_adapter(model, path)
    with pytest.raises(RuntimeError, match="unmerge"):
        metapeft.export_peft(model, tmp_path / "peft")


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    metapeft.save_adapter(injected(seed=1), path)
    old = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(metapeft.atomic_files, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        metapeft.save_adapter(injected(seed=2), path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["a.safetensors"]


@pytest.mark.parametrize("meta", [True, False], ids=["meta", "fixed"])
def test_export_peft_reproduces_logits(tmp_path, meta):
    """qkv with q and v only (block-diagonal B, rank 2r in PEFT), out and mlp1 (rank r), random gamma, head."""
    from peft import PeftModel

    model, x = injected(meta=meta, alpha=5.0), images(3)
    model.eval()
    directory = metapeft.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 3
    assert set(config["rank_pattern"].values()) == {6} and config["modules_to_save"] == ["head"]
    loaded = PeftModel.from_pretrained(tiny_vit(), directory)
    loaded.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_peft_factors_equal_the_delta_weight():
    model = injected()
    qkv = model.blocks[0].attn.qkv
    lora_A, lora_B = metapeft.hf_peft.peft_lora_factors(qkv)
    assert lora_A.shape == (6, 48) and lora_B.shape == (144, 6)
    assert torch.count_nonzero(lora_B[48:96]) == 0
    torch.testing.assert_close(lora_B @ lora_A, qkv.delta_weight())


def test_an_adapter_of_a_deeper_model_names_the_file(tmp_path):
    """Loading into an uninjected model whose blocks the file's layers do not exist in: a LoadError naming the file
    (it was inject's bare ValueError about block indices)."""
    deep = tiny_vit(depth=4)
    metapeft.inject(deep, positions=("q", "v"), layers=[3], rank=2)
    path = metapeft.save_adapter(deep, tmp_path / "deep.safetensors")
    shallow = tiny_vit(depth=2)
    before = {k: v.clone() for k, v in shallow.state_dict().items()}
    with pytest.raises(metapeft.atomic_files.LoadError, match=f"adapter file {path} does not fit the model: .*block "
                                                            "indices in \\[0, 2\\)"):
        metapeft.load_adapter(shallow, path)
    assert not hasattr(shallow, "metapeft_config") and all(torch.equal(before[k], v)
                                                            for k, v in shallow.state_dict().items())
