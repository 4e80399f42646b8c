"""torch.func over the layers (grad, jacrev, vmap over inputs and over modulator settings, functional_call) and the
modulator's dtype rule, against the float64 unfused reference."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import metapeft
from metapeft.reference import adapter_reference, scaled_lora_reference

ATOL = 1e-12


def lora_layer(dtype=torch.float64):
    layer = metapeft.FusedMetaLoRA(nn.Linear(10, 12).to(dtype), rank=2, segments=3)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.modulator.normal_()
    return layer.eval()


def adapter_layer(kind):
    layer = metapeft.FusedMetaAdapter(10, 3, alpha=0.7, kind=kind, activation="gelu").to(torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer.eval()


def lora_reference(layer, params, x):
    """The unfused LoRA of ``layer`` with its PEFT weights and modulator taken from ``params``."""
    scale = nn.functional.softplus(params["modulator"]) * (layer.alpha / layer.rank)
    return scaled_lora_reference(x, layer.base.weight, layer.base.bias, params["lora_A"], params["lora_B"], scale)


def adapter_reference_of(layer, params, x, residual):
    """The unfused adapter of ``layer`` with every parameter taken from ``params``."""
    scale = nn.functional.softplus(params["modulator"]) * layer.alpha
    return adapter_reference(x, residual, params["down_weight"], params["down_bias"], params["up_weight"],
                             params["up_bias"], scale, layer.activation)


def trainable(layer):
    return {name: p.detach() for name, p in layer.named_parameters() if p.requires_grad}


def test_grad_of_functional_call_matches_reference():
    layer, x = lora_layer(), torch.randn(5, 10, dtype=torch.float64)
    params = trainable(layer)
    grads = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    expected = grad(lambda p: lora_reference(layer, p, x).square().sum())(params)
    assert set(grads) == {"lora_A", "lora_B", "modulator"}
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=ATOL, msg=name)


def test_jacrev_over_the_input_matches_reference():
    layer, x = lora_layer(), torch.randn(4, 10, dtype=torch.float64)
    params = trainable(layer)
    torch.testing.assert_close(jacrev(layer)(x), jacrev(lambda t: lora_reference(layer, params, t))(x), rtol=0,
                               atol=ATOL)


def test_vmap_over_inputs_and_over_modulator_settings():
    layer, xs = lora_layer(), torch.randn(6, 3, 10, dtype=torch.float64)
    params = trainable(layer)
    torch.testing.assert_close(vmap(layer)(xs), torch.stack([lora_reference(layer, params, x) for x in xs]), rtol=0,
                               atol=ATOL)
    modulators = torch.randn(5, 3, dtype=torch.float64)
    x = xs[0]
    swept = vmap(lambda m: functional_call(layer, {"modulator": m}, (x,)))(modulators)
    expected = torch.stack([lora_reference(layer, {**params, "modulator": m}, x) for m in modulators])
    torch.testing.assert_close(swept, expected, rtol=0, atol=ATOL)
    per_setting = vmap(grad(lambda m: functional_call(layer, {"modulator": m}, (x,)).sum()))(modulators)
    expected = torch.stack([grad(lambda m: lora_reference(layer, {**params, "modulator": m}, x).sum())(m)
                            for m in modulators])
    torch.testing.assert_close(per_setting, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_adapter_under_grad_jacrev_and_vmap(kind):
    layer = adapter_layer(kind)
    x = torch.randn(4, 10, dtype=torch.float64)
    residual = torch.randn(4, 10, dtype=torch.float64) if kind == "parallel" else None
    params = trainable(layer)

    def ours(p, t):
        return functional_call(layer, p, (t, residual))

    def reference(p, t):
        return adapter_reference_of(layer, p, t, residual)

    grads = grad(lambda p: ours(p, x).square().sum())(params)
    expected = grad(lambda p: reference(p, x).square().sum())(params)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=ATOL, msg=name)
    torch.testing.assert_close(jacrev(lambda t: ours(params, t))(x), jacrev(lambda t: reference(params, t))(x),
                               rtol=0, atol=ATOL)
    modulators = torch.randn(3, 1, dtype=torch.float64)
    torch.testing.assert_close(vmap(lambda m: ours({**params, "modulator": m}, x))(modulators),
                               torch.stack([reference({**params, "modulator": m}, x) for m in modulators]), rtol=0,
                               atol=ATOL)


def test_nan_modulator_is_reported_once_per_change_and_skipped_under_vmap():
    layer, x = lora_layer(), torch.randn(3, 10, dtype=torch.float64)
    layer(x)
    with torch.no_grad():
        layer.modulator[0] = float("nan")
    with pytest.raises(ValueError, match="modulator of FusedMetaLoRA contains NaN"):
        layer(x)
    modulators = torch.full((2, 3), float("nan"), dtype=torch.float64)
    out = vmap(lambda m: functional_call(layer, {"modulator": m}, (x,)))(modulators)  # no data-dependent check
    assert out.isnan().all()


@pytest.mark.parametrize("dtype,expected", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
                         ids=["f64", "f32", "bf16", "f16"])
def test_modulator_dtype_follows_the_base(dtype, expected):
    assert lora_layer(dtype).modulator.dtype == expected
    adapter = metapeft.FusedMetaAdapter(8, 2).to(dtype)
    assert adapter.modulator.dtype == expected and adapter.down_weight.dtype == dtype


def test_float64_gamma_gradient_matches_the_float64_oracle():
    layer = lora_layer()
    x = torch.randn(7, 10, dtype=torch.float64)
    layer(x).square().sum().backward()
    params = {name: p.detach().requires_grad_() for name, p in trainable(layer).items()}
    lora_reference(layer, params, x).square().sum().backward()
    error = (layer.modulator.grad - params["modulator"].grad).abs().max().item()
    assert error <= 1e-12 * params["modulator"].grad.abs().max().item(), error


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_layers_read_parametrized_and_swapped_tensors_as_attribute_access_would():
    # the layers read their tensors from the module dicts (cheaper than attribute access): a parametrization
    # (which takes the name out of those dicts) and a frozen modulator buffer must still be seen
    x = torch.randn(4, 10, dtype=torch.float64)
    layer = lora_layer()
    params = {**trainable(layer), "lora_B": 2 * layer.lora_B.detach()}
    torch.nn.utils.parametrize.register_parametrization(layer, "lora_B", _Doubled())
    torch.testing.assert_close(layer(x), lora_reference(layer, params, x), rtol=0, atol=ATOL)

    adapter = adapter_layer("sequential")
    params = {**trainable(adapter), "up_weight": 2 * adapter.up_weight.detach()}
    torch.nn.utils.parametrize.register_parametrization(adapter, "up_weight", _Doubled())
    torch.testing.assert_close(adapter(x), adapter_reference_of(adapter, params, x, None), rtol=0, atol=ATOL)

    frozen = metapeft.FusedMetaAdapter(10, 3, kind="sequential", meta=False).double()
    frozen.modulator.fill_(-1.0)  # a buffer: read from the buffer dict
    params = {**trainable(frozen), "modulator": frozen.modulator}
    torch.testing.assert_close(frozen(x), adapter_reference_of(frozen, params, x, None), rtol=0, atol=ATOL)
