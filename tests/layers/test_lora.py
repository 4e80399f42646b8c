"""FusedMetaLoRA: construction, forward/backward against the unfused reference, merge, compile, errors."""

import copy

import pytest
import torch
from torch import nn

import metapeft
from metapeft.reference import scaled_lora_reference
from tests.helpers.oracle import assert_2x_rule


def make_layer(in_features=24, out_features=36, rank=4, segments=3, bias=True, dtype=torch.float32, **kwargs):
    base = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    layer = metapeft.FusedMetaLoRA(base, rank=rank, segments=segments, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.modulator.add_(torch.linspace(-0.5, 0.5, layer.modulator.numel(), dtype=layer.modulator.dtype))
    return layer


def reference_output(layer, x):
    lora_A, lora_B = layer.lora_factors()
    return scaled_lora_reference(x, layer.base.weight, layer.base.bias, lora_A, lora_B, layer.scale())


def test_init_equals_base_and_gamma_starts_at_one():
    base = nn.Linear(768, 2304)
    layer = metapeft.FusedMetaLoRA(base, rank=8, alpha=8.0, segments=3)
    x = torch.randn(2, 5, 768)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    torch.testing.assert_close(layer.gamma, torch.ones(3))
    assert layer.lora_A.shape == (24, 768) and layer.lora_B.shape == (2304, 8) and layer.modulator.shape == (3,)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().max() > 0


@pytest.mark.parametrize("constraint", ["softplus", "none"])
@pytest.mark.parametrize("init_gamma", [0.25, 1.0, 3.0])
def test_gamma_constraint_and_init(constraint, init_gamma):
    layer = metapeft.FusedMetaLoRA(nn.Linear(8, 8), rank=2, init_gamma=init_gamma, constraint=constraint)
    torch.testing.assert_close(layer.gamma, torch.full((1,), init_gamma))
    with torch.no_grad():
        layer.modulator.fill_(-2.0)
    expected = torch.nn.functional.softplus(torch.tensor([-2.0])) if constraint == "softplus" else torch.tensor([-2.0])
    torch.testing.assert_close(layer.gamma, expected)


def test_alpha_default_is_rank_and_scale_is_gamma_alpha_over_r():
    layer = metapeft.FusedMetaLoRA(nn.Linear(8, 12), rank=4, segments=3)
    assert layer.alpha == 4.0
    layer2 = metapeft.FusedMetaLoRA(nn.Linear(8, 12), rank=4, alpha=16.0, segments=3)
    torch.testing.assert_close(layer2.scale(), layer2.gamma * 4.0)


def output_and_grads(layer, x, grad, forward):
    """``forward(layer, x)`` and the gradients of <output, grad> wrt x, lora_A, lora_B and the modulator."""
    x = x.detach().requires_grad_(True)
    params = {"x": x, "lora_A": layer.lora_A, "lora_B": layer.lora_B, "modulator": layer.modulator}
    y = forward(layer, x)
    return y.detach(), dict(zip(params, torch.autograd.grad(y, list(params.values()), grad)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_backward_match_float64_oracle_by_2x_rule_any_leading_dims(dtype, bias):
    layer = make_layer(bias=bias, dtype=dtype)
    x, grad = torch.randn(2, 3, 5, 24, dtype=dtype), torch.randn(2, 3, 5, 36, dtype=dtype)
    y, grads = output_and_grads(layer, x, grad, lambda m, t: m(t))
    assert y.shape == (2, 3, 5, 36) and y.dtype == dtype
    y_base, grads_base = output_and_grads(layer, x, grad, reference_output)
    y_ref, grads_ref = output_and_grads(copy.deepcopy(layer).double(), x.double(), grad.double(), reference_output)
    assert_2x_rule("y", y, y_base, y_ref)
    for name in grads_ref:
        assert_2x_rule(f"d{name}", grads[name], grads_base[name], grads_ref[name], floor_dtype=dtype)


def test_autocast_bf16_on_cpu():
    layer = make_layer()
    x = torch.randn(7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_base = reference_output(layer, x)
    assert y.dtype == torch.bfloat16
    assert_2x_rule("y", y, y_base, reference_output(copy.deepcopy(layer).double(), x.double()).detach())
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.modulator.grad is not None


def test_active_segments_leave_inactive_slices_at_base_output():
    layer = make_layer(segments=3, active_segments=(0, 2))
    assert layer.lora_A.shape == (8, 24) and layer.lora_B.shape == (24, 4) and layer.modulator.shape == (2,)
    x = torch.randn(6, 24)
    y = layer(x)
    torch.testing.assert_close(y[:, 12:24], layer.base(x)[:, 12:24])
    per_slice = [
        layer.base(x)[:, 12 * j : 12 * (j + 1)] + layer.scale()[j] * (x @ a.t()) @ b.t()
        for j, a, b in ((0, layer.lora_A[:4], layer.lora_B[:12]), (2, layer.lora_A[4:], layer.lora_B[12:]))
    ]
    torch.testing.assert_close(y[:, :12], per_slice[0])
    torch.testing.assert_close(y[:, 24:], per_slice[1])
    y.sum().backward()
    assert layer.modulator.grad.shape == (2,) and torch.all(layer.modulator.grad != 0)


@pytest.mark.parametrize("active", [None, (0, 2)], ids=["qkv", "q_v"])
def test_channel_gamma_matches_the_reference_with_a_scale_per_output(active):
    """gamma="channel": one modulator per output of the active segments; the output and every gradient equal the
    unfused reference fed the per-output scale built here by hand (zeros on the inactive segment) in float64."""
    layer = make_layer(segments=3, alpha=6.0, gamma="channel", active_segments=active, dtype=torch.float64)
    n_active = 3 if active is None else 2
    assert layer.modulator.shape == (n_active * 12,) and layer.modulator.dtype == torch.float64
    gamma = torch.nn.functional.softplus(layer.modulator)
    columns = [gamma[i * 12:(i + 1) * 12] for i in range(n_active)]
    if active is not None:
        columns.insert(1, torch.zeros(12, dtype=torch.float64))  # the k segment carries no LoRA
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    lora_A, lora_B = layer.lora_factors()
    expected = scaled_lora_reference(x, layer.base.weight, layer.base.bias, lora_A, lora_B,
                                     torch.cat(columns) * (6.0 / 4))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    params = [x, layer.lora_A, layer.lora_B, layer.modulator]
    for got, want in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", ["scalar", "channel"])
def test_merge_unmerge_round_trip(gamma):
    layer = make_layer(segments=3, gamma=gamma)
    x = torch.randn(11, 24)
    weight_before = layer.base.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight_before, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)


def test_dropout_only_in_training_and_reproducible_under_manual_seed():
    layer = make_layer(dropout=0.5)
    x = torch.randn(16, 24)
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    b = layer(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_output(layer, x))


def test_parameter_groups_and_mark_only_peft_trainable():
    model = nn.Sequential(make_layer(), nn.ReLU(), make_layer(in_features=36, out_features=12, segments=1),
                          nn.Linear(12, 3))
    peft, meta = metapeft.peft_parameters(model), metapeft.meta_parameters(model)
    assert [p.shape for p in peft] == [(12, 24), (36, 4), (4, 36), (12, 4)]
    assert [p.shape for p in meta] == [(3,), (1,)]
    metapeft.mark_only_peft_trainable(model, extra=(model[3],))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in peft + meta + list(model[3].parameters())}
    fixed = metapeft.FusedMetaLoRA(nn.Linear(4, 4), rank=2, meta=False)
    assert metapeft.meta_parameters(fixed) == [] and "modulator" in dict(fixed.named_buffers())


def test_torch_compile_fullgraph_matches_eager():
    model = nn.Sequential(make_layer(), nn.GELU(), make_layer(in_features=36, out_features=10, segments=1))
    x = torch.randn(4, 7, 24)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_y = model(x)
    eager_grads = torch.autograd.grad(eager_y.sum(), metapeft.meta_parameters(model))
    y = compiled(x)
    grads = torch.autograd.grad(y.sum(), metapeft.meta_parameters(model))
    torch.testing.assert_close(y, eager_y)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 13}, "rank"),
        ({"rank": 2, "segments": 5}, "segments"),
        ({"rank": 2, "dropout": 1.0}, "dropout"),
        ({"rank": 2, "constraint": "sigmoid"}, "constraint"),
        ({"rank": 2, "backend": "fast"}, "backend"),
        ({"rank": 2, "segments": 3, "active_segments": (3,)}, "active_segments"),
        ({"rank": 2, "init_gamma": 0.0}, "init_gamma"),
        ({"rank": 2, "alpha": float("nan")}, "alpha"),
        ({"rank": 2, "alpha": float("inf")}, "alpha"),
        ({"rank": 2, "alpha": 0.0}, "alpha"),
        ({"rank": 2, "alpha": True}, "alpha"),
        ({"rank": 2, "gamma": "vector"}, "gamma must be one of"),
    ],
)
def test_bad_construction_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        metapeft.FusedMetaLoRA(nn.Linear(12, 12), **kwargs)


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="base"):
        metapeft.FusedMetaLoRA(nn.Conv2d(3, 3, 1), rank=1)
    layer = make_layer()
    with pytest.raises(TypeError, match="x"):
        layer(torch.randn(3, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(3, 24, device="meta"))
    with pytest.raises(ValueError, match="x's last dimension"):
        layer(torch.randn(3, 25))
    with pytest.raises(TypeError, match="x"):
        layer(torch.ones(3, 24, dtype=torch.int64))
    with torch.no_grad():
        layer.modulator[1] = float("nan")
    with pytest.raises(ValueError, match="modulator"):
        layer(torch.randn(3, 24))


def test_backend_selection_and_overrides(monkeypatch):
    layer = make_layer()
    x = torch.randn(2, 24)
    layer(x)
    assert layer.last_backend == "torch"
    try:
        monkeypatch.setenv("METAPEFT_BACKEND", "nonsense")
        layer(x)  # the environment is read once per process: a change needs refresh_backends()
        metapeft.ops.refresh_backends()
        with pytest.raises(ValueError, match="METAPEFT_BACKEND"):
            layer(x)
        monkeypatch.setenv("METAPEFT_BACKEND", "torch")
        metapeft.ops.refresh_backends()
        layer(x)
        assert layer.last_backend == "torch"
    finally:
        monkeypatch.delenv("METAPEFT_BACKEND")
        metapeft.ops.refresh_backends()
    cuda_layer = make_layer(backend="cuda")
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        cuda_layer(x)
