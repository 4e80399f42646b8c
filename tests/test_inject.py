"""inject() on small timm ViTs: placement, q/k/v slices, HF PEFT parity, freezing, merge, compile, errors."""

import copy

import pytest
import timm
import torch
from torch import nn

import metapeft
from metapeft.inject import POSITIONS, ParallelAdapter, SequentialAdapter, peft_modules
from metapeft.modulator import modulator_for_gamma
from tests.helpers.vit import images, randomize, tiny_vit

ALL_LORA = POSITIONS["lora"]
PATHS = {"out": "attn.proj", "mlp1": "mlp.fc1", "mlp2": "mlp.fc2"}


@pytest.mark.parametrize("meta", [True, False], ids=["meta", "fixed"])
def test_fresh_injection_keeps_logits(meta):
    model, x = tiny_vit(), images()
    before = model(x)
    metapeft.inject(model, rank=4, meta=meta)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "positions, layers",
    [(ALL_LORA, "all"), (("q",), [1]), (("k", "v", "mlp1"), [0, 2]), (("q", "v"), "all"),
     (("out", "mlp2"), [2, 0]), (("v", "mlp2"), [1])],
    ids=["all", "q-1", "kv-mlp1-02", "qv", "out-mlp2-20", "v-mlp2-1"],
)
def test_places_exactly_the_modules_asked_for(positions, layers):
    model = tiny_vit()
    summary = metapeft.inject(model, positions=positions, layers=layers, rank=2)
    chosen = range(3) if layers == "all" else sorted(layers)
    assert set(summary.placements) == {(str(i), p) for i in chosen for p in positions}
    qkv = [p for p in ("q", "k", "v") if p in positions]
    for i, block in enumerate(model.blocks):
        if i not in chosen:
            assert all(isinstance(block.get_submodule(p), nn.Linear) for p in ("attn.qkv", *PATHS.values()))
            continue
        if qkv:
            assert isinstance(block.attn.qkv, metapeft.FusedMetaLoRA)
            assert block.attn.qkv.segments == 3
            assert block.attn.qkv.active_segments == tuple("qkv".index(p) for p in qkv)
            assert block.attn.qkv.modulator.shape == (len(qkv),)
        else:
            assert type(block.attn.qkv) is nn.Linear
        for position, path in PATHS.items():
            expected = metapeft.FusedMetaLoRA if position in positions else nn.Linear
            assert type(block.get_submodule(path)) is expected, (i, position)
    n_modules = len(chosen) * (bool(qkv) + sum(p in positions for p in PATHS))
    assert len(peft_modules(model)) == len(summary.modules) == n_modules
    assert summary.meta_parameters == len(chosen) * len(positions)
    peft_count = sum(p.numel() for m in model.modules() if isinstance(m, metapeft.FusedMetaLoRA)
                     for p in (m.lora_A, m.lora_B))
    assert summary.peft_parameters == peft_count
    assert summary.trainable_parameters == peft_count + summary.meta_parameters + 48 * 5 + 5


def test_clip_style_pre_norm_patch14_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_large_patch14_clip_224", pretrained=False, img_size=28, depth=2, embed_dim=48,
                              num_heads=3, num_classes=4)
    assert isinstance(model.norm_pre, nn.LayerNorm)
    x = torch.randn(2, 3, 28, 28)
    before = model(x)
    summary = metapeft.inject(model, rank=2)
    assert len(summary.placements) == 12 and summary.modules[0] == "blocks.0.attn.qkv"
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_freezes_all_but_peft_modulators_and_head():
    model = tiny_vit()
    metapeft.inject(model, positions=("k", "mlp1"), rank=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.{path}.{leaf}" for i in range(3) for path in ("attn.qkv", "mlp.fc1")
                for leaf in ("lora_A", "lora_B", "modulator")} | {"head.weight", "head.bias"}
    assert trainable == expected


def test_meta_false_gives_fixed_scale_plain_lora():
    model = tiny_vit()
    summary = metapeft.inject(model, positions=("q", "out"), rank=2, alpha=6.0, meta=False)
    assert summary.meta_parameters == 0 and metapeft.meta_parameters(model) == []
    qkv = model.blocks[0].attn.qkv
    assert "modulator" in dict(qkv.named_buffers())
    torch.testing.assert_close(qkv.scale(), torch.tensor([3.0, 0.0, 0.0]))


def test_qkv_segments_hit_the_right_slices():
    """Inside the model, the fused qkv LoRA on q and v equals a hand-written per-slice LoRA (float64)."""
    model = tiny_vit(dtype=torch.float64)
    metapeft.inject(model, positions=("q", "v"), layers=[1], rank=3, alpha=5.0)
    randomize(model)
    qkv = model.blocks[1].attn.qkv
    seen = {}
    qkv.register_forward_hook(lambda module, args, out: seen.update(x=args[0], y=out))
    model(images(dtype=torch.float64))
    x, y = seen["x"], seen["y"]
    gamma = nn.functional.softplus(qkv.modulator)
    a_q, a_v = qkv.lora_A.split(3)
    b_q, b_v = qkv.lora_B.split(48)
    base = x @ qkv.base.weight.T + qkv.base.bias
    expected = torch.cat([
        base[..., :48] + gamma[0] * 5.0 / 3 * (x @ a_q.T) @ b_q.T,
        base[..., 48:96],
        base[..., 96:] + gamma[1] * 5.0 / 3 * (x @ a_v.T) @ b_v.T,
    ], dim=-1)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_parity_with_hf_peft_logits_and_gradients():
    """Same A, B and gamma = 1: inject(meta=True) on qkv (one segment), proj, fc1, fc2 == PEFT's LoRA there."""
    from peft import LoraConfig, get_peft_model

    targets = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    ours = tiny_vit(dtype=torch.float64)
    theirs = get_peft_model(copy.deepcopy(ours), LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                            modules_to_save=["head"]))
    summary = metapeft.inject(ours, target_modules=targets, rank=4, alpha=12.0)
    assert len(summary.modules) == 12
    randomize(ours)
    with torch.no_grad():
        for name, module in peft_modules(ours):
            module.modulator.fill_(modulator_for_gamma(1.0, "softplus"))  # float64 on this float64 model
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(module.lora_A)
            peft_layer.lora_B["default"].weight.copy_(module.lora_B)
        theirs.base_model.model.head.modules_to_save["default"].load_state_dict(ours.head.state_dict())
    x = images(3, torch.float64)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(y_ours)
    y_ours.backward(grad_out)
    y_theirs.backward(grad_out)
    for name, module in peft_modules(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(module.lora_A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-9,
                                   atol=1e-10)
        torch.testing.assert_close(module.lora_B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-9,
                                   atol=1e-10)
    torch.testing.assert_close(ours.head.weight.grad,
                               theirs.base_model.model.head.modules_to_save["default"].weight.grad)


@pytest.mark.parametrize("method, positions", [("adaptformer", None), ("adapter", None), ("adapter", ("attn",))],
                         ids=["adaptformer", "houlsby", "houlsby-attn"])
def test_adapters_are_placed_as_asked_and_keep_fresh_logits(method, positions):
    model, x = tiny_vit(), images()
    before = model(x)
    summary = metapeft.inject(model, method=method, positions=positions, layers=[0, 2], rank=4)
    asked = positions or POSITIONS[method]
    assert set(summary.placements) == {(str(i), p) for i in (0, 2) for p in asked}
    wrapper, kind = (ParallelAdapter, "parallel") if method == "adaptformer" else (SequentialAdapter, "sequential")
    for i, block in enumerate(model.blocks):
        for position in ("attn", "mlp"):
            module = getattr(block, position)
            if i in (0, 2) and position in asked:
                assert type(module) is wrapper and module.adapter.kind == kind and module.adapter.bottleneck == 4
            else:
                assert not isinstance(module, (ParallelAdapter, SequentialAdapter))
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    adapter_params = sum(p.numel() for _, m in peft_modules(model) for p in m.peft_parameters())
    assert summary.peft_parameters == adapter_params == len(summary.placements) * (4 * 48 + 4 + 48 * 4 + 48)
    assert summary.trainable_parameters == adapter_params + len(summary.placements) + 48 * 5 + 5


def test_adapter_outputs_match_hand_written_math():
    """AdaptFormer: mlp(h) + gamma*alpha*up(relu(down(h))) with h = norm2(x); Houlsby: a + gamma*up(relu(down(a)))
    after attention (float64, inside the model)."""
    model = tiny_vit(dtype=torch.float64)
    metapeft.inject(model, method="adaptformer", layers=[1], rank=4, alpha=0.1)
    randomize(model)
    houlsby = tiny_vit(dtype=torch.float64)
    metapeft.inject(houlsby, method="adapter", positions=("attn",), layers=[1], rank=4)
    randomize(houlsby)
    seen = {}
    parallel, sequential = model.blocks[1].mlp, houlsby.blocks[1].attn
    parallel.register_forward_hook(lambda module, args, out: seen.update(h=args[0], parallel=out))
    sequential.module.register_forward_hook(lambda module, args, out: seen.update(a=out))
    sequential.register_forward_hook(lambda module, args, out: seen.update(sequential=out))
    x = images(dtype=torch.float64)
    model(x)
    houlsby(x)

    def delta(adapter, t):
        hidden = torch.relu(t @ adapter.down_weight.T + adapter.down_bias)
        return nn.functional.softplus(adapter.modulator) * adapter.alpha * (hidden @ adapter.up_weight.T
                                                                             + adapter.up_bias)

    h, a = seen["h"], seen["a"]
    torch.testing.assert_close(seen["parallel"], parallel.module(h) + delta(parallel.adapter, h))
    torch.testing.assert_close(seen["sequential"], a + delta(sequential.adapter, a))
    assert parallel.adapter.alpha == 0.1 and sequential.adapter.alpha == 1.0


def test_generic_path_on_a_plain_model():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)))
    x = torch.randn(5, 6)
    before = model(x)
    summary = metapeft.inject(model, target_modules=r"2\.\d", rank=2)
    assert summary.modules == ("2.0", "2.1")
    assert type(model[0]) is nn.Linear and isinstance(model[2][1], metapeft.FusedMetaLoRA)
    torch.testing.assert_close(model(x), before)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"2.{i}.{leaf}" for i in range(2) for leaf in ("lora_A", "lora_B", "modulator")}


def test_merge_and_unmerge():
    model, x = tiny_vit(), images()
    metapeft.inject(model, rank=4)
    randomize(model)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("base.weight")}
    expected = model(x)
    assert metapeft.merge(model) == 12
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        metapeft.merge(model)
    assert metapeft.unmerge(model) == 12
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"positions": ("q", "v", "out", "mlp1")}, {"method": "adapter"}],
                         ids=["lora", "houlsby"])
def test_torch_compile_fullgraph_matches_eager(kwargs):
    model, x = tiny_vit(depth=1), images()
    metapeft.inject(model, rank=2, **kwargs)
    randomize(model)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), metapeft.meta_parameters(model))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), metapeft.meta_parameters(model))
    torch.testing.assert_close(y, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "prefix"}, "method"),
        ({"positions": ("q", "z")}, "positions"),
        ({"positions": ()}, "positions"),
        ({"method": "adapter", "positions": ("q",)}, "positions"),
        ({"layers": [0, 3]}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({"layers": "some"}, "layers"),
        ({"rank": 0}, "rank"),
        ({"rank": 49}, "rank"),
        ({"target_modules": ["nothing"]}, "matched no nn.Linear"),
        ({"target_modules": ["fc1"], "positions": ("q",)}, "target_modules"),
        ({"modules_to_save": ["nohead"]}, "modules_to_save"),
        ({"gamma": "vector"}, "gamma must be one of"),
    ],
)
def test_bad_arguments_name_the_argument_and_change_nothing(kwargs, match):
    model = tiny_vit(depth=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        metapeft.inject(model, **kwargs)
    assert not peft_modules(model) and model.state_dict().keys() == state.keys()


def test_adapters_cannot_be_merged():
    model = tiny_vit(depth=1)
    metapeft.inject(model, method="adaptformer", rank=2)
    with pytest.raises(ValueError, match="cannot be merged"):
        metapeft.merge(model)


def test_refuses_second_injection_and_non_vit_models():
    model = tiny_vit(depth=1)
    metapeft.inject(model, rank=2)
    with pytest.raises(ValueError, match="already holds metapeft modules"):
        metapeft.inject(model, rank=2)
    with pytest.raises(TypeError, match="target_modules"):
        metapeft.inject(nn.Sequential(nn.Linear(4, 4)))


# ----- config-first injection ----------------------------------------------------------------------------------
def test_config_object_keywords_and_a_recorded_injection_place_the_same_modules():
    from metapeft.inject import InjectionConfig, injection_config

    by_keywords, by_config, repeated = tiny_vit(), tiny_vit(), tiny_vit()
    metapeft.inject(by_keywords, positions=["v", "q", "mlp2"], layers=[2, 0], rank=3, alpha=6)
    metapeft.inject(by_config, InjectionConfig(positions=("q",), layers=(0, 2), rank=5), positions=["q", "v", "mlp2"],
                    rank=3, alpha=6)  # keywords override the object's fields
    metapeft.inject(repeated, injection_config(by_keywords))  # a recorded injection repeats itself
    record = injection_config(by_keywords)
    assert record.positions == ("q", "v", "mlp2") and record.layers == (0, 2) and record.alpha == 6.0
    assert injection_config(by_config) == record == injection_config(repeated)
    assert [n for n, _ in peft_modules(by_config)] == [n for n, _ in peft_modules(by_keywords)]


@pytest.mark.parametrize("options, match", [
    ({"meta": "yes"}, "meta must be true or false"), ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"layers": [-1]}, "layers"), ({"positions": "q", "method": "adaptformer"}, "positions for method='adaptformer'"),
    ({"target_modules": ["fc1"], "layers": [0]}, "with target_modules leave them unset"), ({"rank": True}, "rank"),
], ids=["meta", "alpha", "layers", "positions", "target-and-layers", "rank-bool"])
def test_the_config_checks_its_fields_without_a_model(options, match):
    from metapeft.inject import InjectionConfig

    with pytest.raises(ValueError, match=match):
        InjectionConfig(**options)


def test_every_option_is_documented_and_is_an_inject_keyword_and_a_yaml_key():
    import inspect

    from metapeft.inject import InjectionConfig
    from metapeft.runs.config import PEFT_KEYS

    names = [spec.name for spec in InjectionConfig.options()]
    keywords = [p.name for p in inspect.signature(metapeft.inject).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert keywords == names == list(PEFT_KEYS)
    assert all(len(spec.metadata["help"]) > 10 for spec in InjectionConfig.options())
    assert all(f"    {name} (" in metapeft.inject.__doc__ for name in names)


def test_placement_strategies_are_tried_in_order(monkeypatch):
    import importlib

    inject_module = importlib.import_module("metapeft.inject")  # metapeft.inject is also the function's name
    seen = []

    def place_first_linear(model, config, factory):  # a strategy for a model family the defaults do not know
        seen.append(config.rank)
        if not isinstance(model, nn.Sequential):
            return None
        placement = inject_module.Placement("0", "0", ("gamma",))
        return inject_module.PlacementPlan(((("0", factory.lora(model[0]), placement)),), ("0",), ("gamma",), None,
                                           "all")

    monkeypatch.setattr(inject_module, "PLACEMENT_STRATEGIES", [place_first_linear,
                                                                *inject_module.PLACEMENT_STRATEGIES])
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    summary = metapeft.inject(plain, rank=2)
    assert summary.modules == ("0",) and isinstance(plain[0], metapeft.FusedMetaLoRA) and type(plain[1]) is nn.Linear
    vit = tiny_vit(depth=1)
    metapeft.inject(vit, rank=3)  # the first strategy declines: the ViT strategy places
    assert seen == [2, 3] and isinstance(vit.blocks[0].attn.qkv, metapeft.FusedMetaLoRA)


def test_an_adapter_file_of_the_generic_path_written_before_the_config_checks_loads():
    from metapeft.inject import Injection, injection_config

    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    metapeft.inject(model, target_modules=["1"], rank=2)
    stored = injection_config(model).to_dict()
    assert stored["positions"] is None and stored["layers"] == "all"
    older = {**stored, "positions": [], "layers": []}  # what metapeft-adapter/2 files of this path hold
    assert Injection.from_dict(older) == injection_config(model)


def test_gamma_granularity_reaches_every_module_and_older_files_without_it_mean_scalar():
    from metapeft.inject import Injection, injection_config

    model = tiny_vit(depth=2)
    summary = metapeft.inject(model, gamma="channel", rank=2)
    qkv = model.blocks[0].attn.qkv
    assert qkv.granularity == "channel" and qkv.modulator.shape == (qkv.out_features,)
    assert summary.meta_parameters == sum(m.out_features for m in model.modules()
                                          if isinstance(m, metapeft.FusedMetaLoRA))
    stored = injection_config(model).to_dict()
    older = {k: v for k, v in stored.items() if k != "gamma"}  # adapter files written before the option
    assert Injection.from_dict(older).gamma == "scalar"
    assert Injection.from_dict(stored) == injection_config(model)
    with pytest.raises(ValueError, match="injection config fields"):
        Injection.from_dict({**older, "unknown": 1})
