"""Dispatch: "auto" on CUDA tensors prefers the backend a recorded GPU check chose; elsewhere nothing changes.
Inside ``double_backward_ahead`` torch calls take the autograd.Function route with the same second derivatives."""

import json

import pytest
import torch

import metapeft
from metapeft.ops import backends
from metapeft.ops.cpp_autograd import python_routes


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """``recorded(name)`` writes a GPU-check choice where dispatch reads it; caches are reset around the test."""
    path = tmp_path / "gpu_default.json"
    monkeypatch.setattr(backends, "GPU_DEFAULT_FILE", path)
    backends.refresh_backends()

    def write(name):
        path.write_text(json.dumps({"cuda_default_backend": name, "git_sha": "abc1234"}))
        backends.refresh_backends()
        return path

    yield write
    backends.refresh_backends()


def test_without_a_recorded_check_auto_keeps_the_built_in_order(recorded):
    assert backends.recorded_cuda_default_backend() is None
    assert backends.auto_order("cuda") == backends.BACKEND_NAMES
    recorded(None)
    assert backends.auto_order("cuda") == backends.BACKEND_NAMES


@pytest.mark.parametrize("name", ["cuda", "triton", "torch"])
def test_a_recorded_choice_goes_first_on_cuda_only(recorded, name):
    recorded(name)
    order = backends.auto_order("cuda")
    assert order[0] == name and sorted(order) == sorted(backends.BACKEND_NAMES)
    assert backends.auto_order("cpu") == backends.BACKEND_NAMES
    assert backends.select_backend("auto", torch.randn(3, 8)) == "torch"


def test_a_recorded_name_that_is_no_backend_is_an_error_naming_the_file(recorded):
    path = recorded("tensorrt")
    with pytest.raises(ValueError, match=f"{path}.*cuda_default_backend.*'tensorrt'"):
        backends.auto_order("cuda")



def _random_layer(kind: str) -> torch.nn.Module:
    """A float64 FusedMetaLoRA (S = 3) or Houlsby adapter with random weights and modulator, x (M, 12)."""
    torch.manual_seed(0)
    if kind == "lora":
        layer = metapeft.FusedMetaLoRA(torch.nn.Linear(12, 12), rank=2, segments=3).double()
    else:
        layer = metapeft.FusedMetaAdapter(12, 3, kind="sequential").double()
    with torch.no_grad():
        for p in (*layer.peft_parameters(), layer.modulator):
            p.normal_()
    return layer


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_double_backward_ahead_routes_torch_calls_through_the_function_with_the_same_second_derivatives(kind):
    layer = _random_layer(kind)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    function_node = "_FusedFunctionBackward"
    second = {}
    for ahead in (False, True):
        # the Python routes, as without metapeft._C (where it is built, both take the C++ route: test_cpp_route.py)
        with python_routes(), backends.double_backward_ahead() if ahead else torch.enable_grad():
            assert backends.DOUBLE_BACKWARD_AHEAD[0] == int(ahead)
            y = layer(x)
            value = y.sin().sum()
        assert (type(y.grad_fn).__name__ == function_node) == ahead
        grads = torch.autograd.grad(value, [x, *layer.peft_parameters()], create_graph=True)
        v = [torch.ones_like(g) for g in grads]
        second[ahead] = torch.autograd.grad(grads, [layer.modulator, x], grad_outputs=v)
    assert backends.DOUBLE_BACKWARD_AHEAD[0] == 0
    for composite, function in zip(second[False], second[True]):
        torch.testing.assert_close(function, composite, rtol=1e-10, atol=1e-12)
