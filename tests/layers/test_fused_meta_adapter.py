"""FusedMetaAdapter: construction, forward/backward against the unfused reference, meta/fixed scale, compile, errors."""

import copy

import pytest
import torch
from torch import nn

import metapeft
from metapeft.reference import adapter_reference
from tests.helpers.oracle import assert_2x_rule


def make_adapter(dim=24, bottleneck=6, kind="parallel", dtype=torch.float32, **kwargs):
    """An adapter with non-zero up weights and a gamma away from 1, so every gradient path is exercised."""
    layer = metapeft.FusedMetaAdapter(dim, bottleneck, kind=kind, **kwargs).to(dtype)
    with torch.no_grad():
        layer.up_weight.normal_()
        layer.up_bias.normal_()
        layer.down_bias.normal_()
        layer.modulator.add_(0.3)
    return layer


def reference_output(layer, x, residual):
    return adapter_reference(x, residual, layer.down_weight, layer.down_bias, layer.up_weight, layer.up_bias,
                             layer.scale(), layer.activation)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_init_adds_nothing_and_gamma_starts_at_one(kind):
    layer = metapeft.FusedMetaAdapter(768, 16, alpha=0.1, kind=kind)
    x, residual = torch.randn(2, 5, 768), torch.randn(2, 5, 768)
    out = layer(x, residual) if kind == "parallel" else layer(x)
    torch.testing.assert_close(out, residual if kind == "parallel" else x, rtol=0, atol=0)
    torch.testing.assert_close(layer.gamma, torch.ones(1))
    torch.testing.assert_close(layer.scale(), torch.full((1,), 0.1))
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"down_weight": (16, 768), "down_bias": (16,), "up_weight": (768, 16), "up_bias": (768,),
                      "modulator": (1,)}
    assert torch.count_nonzero(layer.up_weight) == 0 and torch.count_nonzero(layer.up_bias) == 0
    assert layer.down_weight.abs().max() > 0 and layer.down_weight.abs().max() <= 1 / 768**0.5 + 1e-6


def output_and_grads(layer, x, residual, grad, forward):
    """``forward(layer, x, residual)`` and the gradients of <output, grad> wrt x, every parameter and the residual."""
    x = x.detach().requires_grad_(True)
    residual = None if residual is None else residual.detach().requires_grad_(True)
    inputs = {"x": x, **dict(layer.named_parameters()), **({"residual": residual} if residual is not None else {})}
    out = forward(layer, x, residual)
    return out.detach(), dict(zip(inputs, torch.autograd.grad(out, list(inputs.values()), grad)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("kind,activation", [("parallel", "relu"), ("sequential", "gelu")])
def test_forward_backward_match_float64_oracle_by_2x_rule_any_leading_dims(dtype, kind, activation):
    layer = make_adapter(kind=kind, activation=activation, alpha=0.7, dtype=dtype)
    x, grad = torch.randn(2, 3, 5, 24, dtype=dtype), torch.randn(2, 3, 5, 24, dtype=dtype)
    residual = torch.randn(2, 3, 5, 24, dtype=dtype) if kind == "parallel" else None
    out, grads = output_and_grads(layer, x, residual, grad, lambda m, t, r: m(t, r))
    assert out.shape == (2, 3, 5, 24) and out.dtype == dtype
    out_base, grads_base = output_and_grads(layer, x, residual, grad, reference_output)
    out_ref, grads_ref = output_and_grads(copy.deepcopy(layer).double(), x.double(),
                                          None if residual is None else residual.double(), grad.double(),
                                          reference_output)
    assert_2x_rule("out", out, out_base, out_ref)
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert_2x_rule(f"d{name}", grads[name], grads_base[name], grads_ref[name], floor_dtype=dtype)


def test_softplus_modulator_gradient_and_alpha():
    layer = make_adapter(alpha=2.5, dtype=torch.float64)
    x, residual = torch.randn(9, 24, dtype=torch.float64), torch.randn(9, 24, dtype=torch.float64)
    layer(x, residual).sum().backward()
    delta = reference_output(layer, x, residual).detach() - residual
    expected = (delta / layer.scale().detach()).sum() * 2.5 * torch.sigmoid(layer.modulator.detach())
    torch.testing.assert_close(layer.modulator.grad, expected.reshape(1))


def test_meta_false_is_a_fixed_scale():
    layer = metapeft.FusedMetaAdapter(16, 4, alpha=0.5, kind="sequential", meta=False, init_gamma=2.0)
    assert "modulator" in dict(layer.named_buffers()) and "modulator" not in dict(layer.named_parameters())
    assert layer.meta_parameters() == []
    assert [id(p) for p in layer.peft_parameters()] == [id(layer.down_weight), id(layer.down_bias),
                                                         id(layer.up_weight), id(layer.up_bias)]
    torch.testing.assert_close(layer.scale(), torch.ones(1))
    model = nn.Sequential(nn.Linear(16, 16), layer)
    assert len(metapeft.peft_parameters(model)) == 4 and metapeft.meta_parameters(model) == []
    learnable = nn.Sequential(nn.Linear(16, 16), metapeft.FusedMetaAdapter(16, 4))
    assert [p.shape for p in metapeft.meta_parameters(learnable)] == [torch.Size([1])]


def test_dropout_only_in_training_and_reproducible_under_manual_seed():
    layer = make_adapter(kind="sequential", dropout=0.5)
    x = torch.randn(30, 24)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_output(layer, x, None))
    layer.train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), a, rtol=0, atol=0)
    assert not torch.allclose(a, layer(x))


def test_autocast_bf16_on_cpu():
    layer = make_adapter()
    x, residual = torch.randn(7, 24), torch.randn(7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, residual)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x, residual), rtol=3e-2, atol=1e-1)
    out.float().sum().backward()
    assert layer.up_weight.grad.dtype == torch.float32 and layer.modulator.grad is not None


def test_compile_fullgraph_forward_and_backward():
    layer = make_adapter(kind="sequential", activation="gelu", dropout=0.2)
    layer.eval()
    x = torch.randn(3, 5, 24, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    out.sum().backward()
    expected = torch.autograd.grad(reference_output(layer, x, None).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    assert layer.modulator.grad is not None and layer.last_backend == "torch"


def test_injected_wrappers_compose():
    mlp = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24))
    parallel = make_adapter()
    x = torch.randn(4, 24)
    torch.testing.assert_close(parallel(x, residual=mlp(x)), reference_output(parallel, x, mlp(x)))
    sequential = make_adapter(kind="sequential")
    h = mlp(x)
    torch.testing.assert_close(sequential(h), h + (reference_output(sequential, h, None) - h))


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_channel_gamma_scales_each_output_column_float64(kind):
    """gamma="channel": a (D,) modulator; output and every gradient equal the unfused reference fed the scale
    softplus(modulator) * alpha built here, in float64."""
    layer = make_adapter(kind=kind, alpha=0.5, gamma="channel", dtype=torch.float64)
    assert layer.modulator.shape == (24,)
    with torch.no_grad():
        layer.modulator.copy_(torch.linspace(-1.0, 1.5, 24, dtype=torch.float64))
    x = torch.randn(3, 4, 24, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(3, 4, 24, dtype=torch.float64) if kind == "parallel" else None
    out = layer(x, residual)
    expected = adapter_reference(x, residual, layer.down_weight, layer.down_bias, layer.up_weight, layer.up_bias,
                                 torch.nn.functional.softplus(layer.modulator) * 0.5, layer.activation)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    params = [x, *layer.peft_parameters(), layer.modulator]
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


BAD_CONSTRUCTION = {
    "dim": (dict(dim=0), "dim must be a positive int"),
    "bottleneck": (dict(bottleneck=0), "bottleneck must be a positive int"),
    "kind": (dict(kind="series"), "kind must be one of"),
    "activation": (dict(activation="tanh"), "activation must be one of"),
    "dropout": (dict(dropout=1.0), "dropout must be in"),
    "constraint": (dict(constraint="square"), "constraint must be one of"),
    "backend": (dict(backend="fast"), "backend must be"),
    "init_gamma": (dict(init_gamma=0.0), "init_gamma must be .*> 0"),
    "alpha_nan": (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
    "alpha_inf": (dict(alpha=float("inf")), "alpha must be a finite number > 0"),
    "alpha_zero": (dict(alpha=0.0), "alpha must be a finite number > 0"),
    "gamma": (dict(gamma="per_channel"), "gamma must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTION))
def test_bad_construction_raises_naming_the_argument(case):
    changes, match = BAD_CONSTRUCTION[case]
    kwargs = {"dim": 8, "bottleneck": 2, **changes}
    with pytest.raises(ValueError, match=match):
        metapeft.FusedMetaAdapter(**kwargs)


def test_bad_forward_calls_raise():
    parallel, sequential = metapeft.FusedMetaAdapter(8, 2), metapeft.FusedMetaAdapter(8, 2, kind="sequential")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="needs residual"):
        parallel(x)
    with pytest.raises(ValueError, match="pass no residual"):
        sequential(x, x)
    with pytest.raises(ValueError, match="x's last dimension"):
        sequential(torch.randn(3, 9))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        sequential(x.double())
    with pytest.raises(TypeError, match="x must be a floating-point"):
        sequential(x.long())
    with torch.no_grad():
        sequential.modulator.fill_(float("nan"))
    with pytest.raises(ValueError, match="modulator of FusedMetaAdapter contains NaN"):
        sequential(x)
