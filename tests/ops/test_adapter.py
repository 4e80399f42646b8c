"""The adapter op (torch backend) against a float64 oracle, gradcheck, opcheck and its contracts."""

import pytest
import torch

from metapeft.ops import select_backend
from metapeft.ops.adapter_op import adapter, adapter_fwd
from metapeft.reference import adapter_reference
from tests.helpers.adapter import NAMES, forward_backward, make_inputs
from tests.helpers.oracle import HostReadCounter, assert_2x_rule, non_contiguous

# (M, D, b, kind): M = 1 and odd sizes, D not a multiple of 16, bottlenecks 1..64, both residual forms.
SHAPES = [(1, 40, 1, "parallel"), (7, 72, 4, "sequential"), (97, 200, 8, "parallel"), (1000, 72, 16, "sequential"),
          (33, 96, 64, "parallel")]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def fused_torch(*args, **kwargs):
    return adapter(*args, backend="torch", **kwargs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_D{}_b{}_{}".format(*s))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_torch_backend_matches_float64_oracle_by_2x_rule(shape, dtype_name, channel):
    dtype = DTYPES[dtype_name]
    *shape, kind = shape
    activation = "gelu" if shape[2] % 2 == 0 else "relu"
    inputs64, inputs = make_inputs(*shape, dtype=dtype, residual=kind == "parallel", channel=channel)
    grad_out = non_contiguous(torch.randn(shape[0], shape[1], dtype=dtype))
    grad64 = grad_out.double()
    torch.full((shape[0] * shape[1] * 4,), float("nan"), dtype=dtype)  # poison freed memory the op may reuse

    y_fast, g_fast = forward_backward(fused_torch, inputs, grad_out, non_contiguous, activation=activation)
    y_base, g_base = forward_backward(adapter_reference, inputs, grad_out, activation=activation)
    y_ref, g_ref = forward_backward(adapter_reference, inputs64, grad64, activation=activation)
    assert y_fast.dtype == dtype
    assert_2x_rule("out", y_fast, y_base, y_ref)
    # The unfused d scale is computed and rounded in the compute dtype (it is the gradient of scale.to(dtype)):
    # cast it back so that its float32 storage does not tighten the floor below that dtype's.
    g_base["scale"] = g_base["scale"].to(dtype)
    for name in g_ref:
        assert_2x_rule(f"d{name}", g_fast[name], g_base[name], g_ref[name])


GRADCHECK_CASES = [
    ("parallel", "relu", True, 0.0),
    ("sequential", "gelu", True, 0.0),
    ("parallel", "gelu", False, 0.3),
    ("sequential", "relu", True, 0.3),
]


@pytest.mark.parametrize("kind,activation,bias,dropout", GRADCHECK_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_gradcheck_and_gradgradcheck_float64(kind, activation, bias, dropout, channel):
    _, inputs = make_inputs(5, 7, 3, dtype=torch.float64, residual=kind == "parallel", bias=bias, channel=channel)
    inputs["scale"] = inputs["scale"].double()
    leaves = tuple(None if inputs[k] is None else inputs[k].requires_grad_(True) for k in NAMES)

    def op(*args):
        return adapter(*args, activation=activation, dropout_p=dropout, seed=11, backend="torch")

    assert torch.autograd.gradcheck(op, leaves)
    assert torch.autograd.gradgradcheck(op, leaves)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_double_backward_matches_float64_autograd_oracle(kind, activation, channel):
    _, inputs = make_inputs(9, 12, 4, dtype=torch.float64, residual=kind == "parallel", channel=channel)
    inputs["scale"] = inputs["scale"].double()
    names = [k for k in NAMES if inputs[k] is not None]
    leaves = {k: inputs[k].requires_grad_(True) for k in names}
    v = torch.randn(9, 12, dtype=torch.float64)

    def hvp(fn):
        out = fn(*(leaves.get(k) for k in NAMES), activation=activation, dropout_p=0.2, seed=5)
        grads = torch.autograd.grad(out, tuple(leaves.values()), v, create_graph=True)
        inner = sum((g * torch.ones_like(g).cumsum(0)).sum() for g in grads)
        return torch.autograd.grad(inner, tuple(leaves.values()), allow_unused=True, materialize_grads=True)

    fused = hvp(fused_torch)
    expected = hvp(adapter_reference)
    for name, a, b in zip(names, fused, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"second derivative wrt {name}")


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_forward_mode_jvp_matches_reference(kind, channel):
    _, inputs = make_inputs(9, 12, 4, dtype=torch.float64, residual=kind == "parallel", channel=channel)
    inputs["scale"] = inputs["scale"].double()
    names = [k for k in NAMES if inputs[k] is not None]
    primals = tuple(inputs[k] for k in names)
    tangents = tuple(torch.randn_like(p) for p in primals)

    def call(fn):
        return lambda *a: fn(*(dict(zip(names, a)).get(k) for k in NAMES), activation="gelu", dropout_p=0.3, seed=4)

    _, fused = torch.func.jvp(call(fused_torch), primals, tangents)
    _, expected = torch.func.jvp(call(adapter_reference), primals, tangents)
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind,bias", [("parallel", True), ("sequential", False)], ids=["parallel", "seq_nobias"])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_opcheck(kind, bias, channel):
    _, inputs = make_inputs(6, 10, 3, dtype=torch.float32, residual=kind == "parallel", bias=bias, channel=channel)
    for k in ("x", "residual", "down_weight", "up_weight", "scale"):
        if inputs[k] is not None:
            inputs[k].requires_grad_(True)
    args = (*(inputs[k] for k in NAMES), "gelu", 0.25, torch.tensor(5), "torch")
    torch.library.opcheck(torch.ops.metapeft.adapter_fwd.default, args)
    z = torch.ops.metapeft.adapter_fwd(*args)[1]
    detached = {k: None if v is None else v.detach() for k, v in inputs.items()}
    weights = (detached["down_weight"], detached["up_weight"], detached["up_bias"], detached["scale"])
    bwd_args = (torch.randn(6, 10), detached["x"], *weights, z, "gelu", 0.25, torch.tensor(5), kind == "sequential",
                "torch", [True, True, bias, True, bias, True])
    torch.library.opcheck(torch.ops.metapeft.adapter_bwd.default, bwd_args)


def test_op_never_reads_scale_on_host():
    _, inputs = make_inputs(8, 16, 4, dtype=torch.float32)
    leaves = [inputs[k].requires_grad_(True) for k in NAMES]
    with HostReadCounter() as counter:
        out, _ = adapter_fwd(*leaves, "gelu", 0.0, None, "torch")
        out.sum().backward()
    assert counter.count == 0


@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["p0", "p0.5"])  # autograd through the forward / the Function
@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_only_x_and_small_tensors_saved_for_backward(kind, dropout):
    M, D, b = 64, 48, 8
    _, inputs = make_inputs(M, D, b, dtype=torch.float32, residual=kind == "parallel")
    for v in inputs.values():
        if v is not None:
            v.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        adapter(*(inputs[k] for k in NAMES), dropout_p=dropout, seed=3, backend="torch")
    large = [t for t in saved if t.numel() >= M * D]
    assert any(t.shape == (M, b) for t in saved), "z was not saved"
    assert all(t.dtype != torch.bool for t in saved), "a dropout mask was saved"
    assert len(large) == 1 and large[0].data_ptr() == inputs["x"].data_ptr(), [tuple(t.shape) for t in saved]


def test_zero_scale_gives_the_residual_and_a_real_scale_gradient():
    inputs64, _ = make_inputs(20, 12, 4, dtype=torch.float64)
    inputs64["scale"] = torch.zeros(1, dtype=torch.float64)
    grad_out = torch.randn(20, 12, dtype=torch.float64)
    out, grads = forward_backward(fused_torch, inputs64, grad_out)
    _, expected = forward_backward(adapter_reference, inputs64, grad_out)
    torch.testing.assert_close(out, inputs64["residual"], rtol=0, atol=0)
    assert grads["scale"].abs().item() > 0
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_leading_dimensions_and_dropout_seed():
    _, inputs = make_inputs(24, 10, 3, dtype=torch.float32)
    x, residual = inputs["x"].view(2, 3, 4, 10), inputs["residual"].view(2, 3, 4, 10)
    rest = tuple(inputs[k] for k in NAMES[2:])
    a = adapter(x, residual, *rest, dropout_p=0.4, seed=7, backend="torch")
    assert a.shape == (2, 3, 4, 10)
    torch.testing.assert_close(a, adapter(x, residual, *rest, dropout_p=0.4, seed=7, backend="torch"), rtol=0, atol=0)
    assert not torch.allclose(a, adapter(x, residual, *rest, dropout_p=0.4, seed=8, backend="torch"))
    torch.testing.assert_close(a, adapter_reference(x, residual, *rest, dropout_p=0.4, seed=7))


def test_backward_uses_the_forward_dropout_mask():
    inputs64, _ = make_inputs(40, 20, 5, dtype=torch.float64, residual=False)
    grad_out = torch.randn(40, 20, dtype=torch.float64)
    kwargs = {"activation": "gelu", "dropout_p": 0.5, "seed": 123}
    out, grads = forward_backward(fused_torch, inputs64, grad_out, **kwargs)
    out_ref, grads_ref = forward_backward(adapter_reference, inputs64, grad_out, **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-10, msg=name)


def _bad(**changes):
    _, inputs = make_inputs(5, 8, 3, dtype=torch.float32)
    kwargs = {"activation": "relu", "dropout_p": 0.0}
    for k, v in changes.items():
        (inputs if k in NAMES else kwargs)[k] = v(inputs) if callable(v) else v
    return inputs, kwargs


BAD_INPUTS = {
    "x_int": (dict(x=lambda i: i["x"].long()), TypeError, "x must be a floating-point"),
    "x_dtype_mismatch": (dict(x=lambda i: i["x"].double()), TypeError, "has dtype torch.float32 but x has"),
    "residual_shape": (dict(residual=lambda i: i["residual"][:4]), ValueError, "residual must have x's shape"),
    "residual_dtype": (dict(residual=lambda i: i["residual"].half()), TypeError, "residual has dtype"),
    "x_dim": (dict(x=lambda i: i["x"][:, :7]), ValueError, "x's last dimension"),
    "up_shape": (dict(up_weight=lambda i: i["up_weight"][:, :2]), ValueError, "up_weight must have shape"),
    "down_1d": (dict(down_weight=lambda i: i["down_weight"][0]), ValueError, "down_weight must be 2-D"),
    "bottleneck_0": (dict(down_weight=lambda i: i["down_weight"][:0]), ValueError, "bottleneck"),
    "down_bias_shape": (dict(down_bias=lambda i: i["down_bias"][:2]), ValueError, "down_bias must have shape"),
    "up_bias_shape": (dict(up_bias=lambda i: i["up_bias"][:2]), ValueError, "up_bias must have shape"),
    "scale_shape": (dict(scale=lambda i: i["scale"].repeat(2)), ValueError, r"scale must have shape \(1,\).*\(8,\)"),
    "scale_float": (dict(scale=0.5), TypeError, "scale must be a tensor"),
    "scale_nan": (dict(scale=lambda i: torch.full((1,), float("nan"))), ValueError, "scale contains NaN"),
    "activation": (dict(activation="tanh"), ValueError, "activation must be one of"),
    "dropout": (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_naming_the_argument(case):
    changes, error, match = BAD_INPUTS[case]
    inputs, kwargs = _bad(**changes)
    with pytest.raises(error, match=match):
        adapter(*(inputs[k] for k in NAMES), backend="torch", **kwargs)


def test_unknown_backend_raises():
    _, inputs = make_inputs(3, 8, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be"):
        adapter(*(inputs[k] for k in NAMES), backend="nope")
    assert select_backend("torch", inputs["x"], "adapter") == "torch"
