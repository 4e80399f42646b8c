"""The C++ route of an eager call (csrc/autograd.cpp, where metapeft._C is built): taken where it should be, equal to
the Python composite route in float64 (outputs, gradients, second derivatives), within the 2x rule against the float64
oracle, and passing opcheck; the Python routes stay under torch.func, with dropout and without the extension."""

import pytest
import torch

import metapeft
from metapeft.ops.cpp_autograd import python_routes
from metapeft.ops.scaled_lora_op import SCALED_LORA
from metapeft.reference import scaled_lora_reference
from tests.helpers.adapter import make_inputs as adapter_inputs
from tests.helpers.cpp_route import assert_cpp_node, check_adapter_by_2x_rule, check_scaled_lora_by_2x_rule
from tests.helpers.oracle import non_contiguous
from tests.helpers.scaled_lora import GRANULARITIES
from tests.helpers.scaled_lora import make_inputs as lora_inputs

pytestmark = pytest.mark.skipif(SCALED_LORA.cpp_op is None, reason="metapeft._C is not built here")


def _lora(segments=3, bias=True, constraint="softplus", active=None, dtype=torch.float64, gamma="scalar"):
    torch.manual_seed(0)
    layer = metapeft.FusedMetaLoRA(torch.nn.Linear(12, 6 * segments, bias=bias), rank=2, alpha=3.0,
                                   segments=segments, constraint=constraint, active_segments=active,
                                   gamma=gamma).to(dtype)
    with torch.no_grad():
        for p in (*layer.peft_parameters(), layer.modulator):
            p.normal_()
    return layer


def _adapter(kind="parallel", activation="gelu", constraint="softplus", dtype=torch.float64, gamma="scalar"):
    torch.manual_seed(0)
    layer = metapeft.FusedMetaAdapter(12, 3, alpha=2.0, kind=kind, activation=activation, constraint=constraint,
                                      gamma=gamma).to(dtype)
    with torch.no_grad():
        for p in (*layer.peft_parameters(), layer.modulator):
            p.normal_()
    return layer


def _call(layer, x, residual):
    return layer(x) if residual is None else layer(x, residual)


def _first_and_second(layer, x, residual):
    """y, first derivatives of sum(sin(y)) w.r.t. x, residual and the PEFT weights, and the second derivatives of
    their sum w.r.t. the modulator and x."""
    y = _call(layer, x, residual)
    wrt = [x, *([] if residual is None else [residual]), *layer.peft_parameters()]
    first = torch.autograd.grad(y.sin().sum(), wrt, create_graph=True)
    second = torch.autograd.grad(sum((g * g.detach().cos()).sum() for g in first), [layer.modulator, x])
    return y, first, second


LAYERS = {
    "lora_S3": lambda: (_lora(), False),
    "lora_S1_nobias": lambda: (_lora(segments=1, bias=False), False),
    "lora_exp": lambda: (_lora(constraint="exp"), False),
    "lora_none": lambda: (_lora(constraint="none"), False),
    "lora_active_q_v": lambda: (_lora(active=(0, 2)), False),
    "adapter_parallel_gelu": lambda: (_adapter(), True),
    "adapter_sequential_relu": lambda: (_adapter("sequential", "relu"), False),
    "adapter_exp": lambda: (_adapter(constraint="exp"), True),
    "lora_channel_S3": lambda: (_lora(gamma="channel"), False),
    "lora_channel_S1_nobias": lambda: (_lora(segments=1, bias=False, gamma="channel"), False),
    "lora_channel_active_q_v": lambda: (_lora(active=(0, 2), gamma="channel"), False),
    "adapter_channel_parallel": lambda: (_adapter(gamma="channel"), True),
    "adapter_channel_sequential_relu": lambda: (_adapter("sequential", "relu", gamma="channel"), False),
}


@pytest.mark.parametrize("case", LAYERS)
def test_cpp_route_equals_python_route_with_second_derivatives_float64(case):
    layer, with_residual = LAYERS[case]()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True) if with_residual else None
    y = _call(layer, x, residual)
    assert "metapeft" in y.grad_fn.name(), y.grad_fn.name()  # the C++ node, not a Python Function or composite
    cpp = _first_and_second(layer, x, residual)
    with python_routes():
        assert "metapeft" not in _call(layer, x, residual).grad_fn.name()
        composite = _first_and_second(layer, x, residual)
    for got, want in zip((cpp[0], *cpp[1], *cpp[2]), (composite[0], *composite[1], *composite[2])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(97, 40, 72, 4, 3), (1, 40, 48, 1, 1)], ids=["M97_S3", "M1_S1"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cpp_route_scaled_lora_by_2x_rule(dtype, shape, granularity):
    inputs64, inputs = lora_inputs(*shape, dtype=dtype, granularity=granularity)
    grad64 = torch.randn(shape[0], shape[2], dtype=torch.float64)
    check_scaled_lora_by_2x_rule(inputs64, inputs, grad64, transform=non_contiguous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("residual", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_cpp_route_adapter_by_2x_rule(dtype, residual, channel):
    inputs64, inputs = adapter_inputs(97, 40, 7, dtype, residual=residual, channel=channel)
    check_adapter_by_2x_rule(inputs64, inputs, torch.randn(97, 40, dtype=torch.float64))


def test_opcheck_cpp_ops():
    torch.manual_seed(3)
    f64 = {"dtype": torch.float64}
    x = torch.randn(5, 12, **f64, requires_grad=True)
    lora = (torch.randn(6, 12, **f64), torch.randn(6, **f64), torch.randn(6, 12, **f64, requires_grad=True),
            torch.randn(6, 2, **f64, requires_grad=True), torch.randn(3, **f64, requires_grad=True))
    torch.library.opcheck(torch.ops.metapeft.scaled_lora.default, (x, *lora, "softplus", 0.5))
    weights = [torch.randn(*shape, **f64, requires_grad=True) for shape in ((3, 12), (3,), (12, 3), (12,), (1,))]
    torch.library.opcheck(torch.ops.metapeft.adapter.default, (x, None, *weights, "exp", 2.0, "gelu"))
    residual = torch.randn(5, 12, **f64, requires_grad=True)
    torch.library.opcheck(torch.ops.metapeft.adapter.default,
                          (x, residual, weights[0], None, weights[2], None, weights[4], "none", 1.0, "relu"))
    per_channel = torch.randn(6, **f64, requires_grad=True)  # one modulator per output channel
    torch.library.opcheck(torch.ops.metapeft.scaled_lora.default, (x, *lora[:4], per_channel, "softplus", 0.5))
    adapter_channel = torch.randn(12, **f64, requires_grad=True)
    torch.library.opcheck(torch.ops.metapeft.adapter.default, (x, residual, *weights[:4], adapter_channel, "exp",
                                                               2.0, "gelu"))


def test_python_routes_kept_under_func_dropout_and_compile_flags():
    layer = _lora()
    x = torch.randn(4, 12, dtype=torch.float64)
    params = dict(layer.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
    with python_routes():
        want = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
    for name in grads:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-10, atol=1e-12)
    dropped = metapeft.FusedMetaLoRA(torch.nn.Linear(12, 12), rank=2, dropout=0.2).train()
    assert "metapeft" not in dropped(x.float().requires_grad_()).grad_fn.name()  # the torch mask: Python route


def test_cpp_route_under_inference_mode_and_no_grad():
    layer = _lora()
    x = torch.randn(3, 12, dtype=torch.float64)
    want = layer(x).detach()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    with torch.no_grad():
        assert layer(x).grad_fn is None


def _node_case(kind):
    """A float64 layer on the C++ route, its inputs (x and, for the parallel adapter, a residual) and its leaves."""
    if kind == "lora":
        layer, with_residual = _lora(), False
    else:
        layer, with_residual = _adapter(gamma="channel"), True
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True) if with_residual else None
    leaves = [x, *([] if residual is None else [residual]), *layer.peft_parameters(), layer.modulator]
    return layer, x, residual, leaves


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_cpp_node_computes_each_requested_gradient_alone(kind):
    layer, x, residual, leaves = _node_case(kind)
    y = _call(layer, x, residual)
    assert "metapeft" in y.grad_fn.name()
    grad_y = torch.randn_like(y)
    with python_routes():
        want = torch.autograd.grad(_call(layer, x, residual), leaves, grad_y)
    for leaf, expected in zip(leaves, want):
        (got,) = torch.autograd.grad(y, [leaf], grad_y, retain_graph=True)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_cpp_node_frees_its_saved_tensors_and_checks_their_versions(kind):
    layer, x, residual, leaves = _node_case(kind)
    y = _call(layer, x, residual)
    first = torch.autograd.grad(y.sum(), leaves, retain_graph=True)
    again = torch.autograd.grad(y.sum(), leaves)  # retained once: the same gradients
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    y = _call(layer, x, residual)
    with torch.no_grad():
        layer.modulator.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_cpp_node_honours_saved_tensor_hooks_and_checkpointing(kind):
    layer, x, residual, leaves = _node_case(kind)
    grad_y = torch.randn(2, 5, 12 if kind == "adapter" else 18, dtype=torch.float64)
    want = torch.autograd.grad(_call(layer, x, residual), leaves, grad_y)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return ("packed", t.clone())

    def unpack(saved):
        unpacked.append(saved)
        return saved[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = _call(layer, x, residual)
    assert "metapeft" in y.grad_fn.name() and packed
    got = torch.autograd.grad(y, leaves, grad_y)
    assert len(unpacked) == len(packed)
    checkpointed = torch.utils.checkpoint.checkpoint(_call, layer, x, residual, use_reentrant=False)
    got_checkpointed = torch.autograd.grad(checkpointed, leaves, grad_y)
    for a, b, expected in zip(got, got_checkpointed, want):
        torch.testing.assert_close(a, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_cpp_node_runs_under_compiled_autograd(kind):
    from torch._dynamo import compiled_autograd

    layer, x, residual, leaves = _node_case(kind)
    with python_routes():
        want = torch.autograd.grad(_call(layer, x, residual).sin().sum(), leaves)
    torch._dynamo.reset()
    for _ in range(2):  # a compile, then a cache hit
        y = _call(layer, x, residual)
        assert "metapeft" in y.grad_fn.name()
        with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
            y.sin().sum().backward()
        for leaf, expected in zip(leaves, want):
            torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=1e-12)
            leaf.grad = None


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cpp_route_per_segment_products_at_large_shapes_float64(granularity):
    """At S > 1 with M N r >= 2**22 the rank-space products run per segment (bmm) instead of on the block-diagonal B:
    outputs, gradients and a double backward equal the float64 reference."""
    inputs64, _ = lora_inputs(512, 64, 1536, 8, 3, dtype=torch.float64, granularity=granularity)
    assert 512 * 1536 * 8 >= 2**22
    leaves = {k: v.requires_grad_(True) for k, v in inputs64.items()}
    grad64 = torch.randn(512, 1536, dtype=torch.float64)

    def first_and_second(fn):
        y = fn(*leaves.values())
        first = torch.autograd.grad(y, list(leaves.values()), grad64, create_graph=True)
        inner = sum((g * g.detach().cos()).sum() for g in first if g.grad_fn is not None)
        return (y, *first, *torch.autograd.grad(inner, [leaves["x"], leaves["scale"]]))

    got = first_and_second(lambda *a: assert_cpp_node(metapeft.ops.scaled_lora(*a, backend="torch")))
    want = first_and_second(scaled_lora_reference)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_cpp_node_takes_strided_weights(kind):
    """Weights passed as strided views (as torch.func.functional_call may pass them) give the Python route's
    gradients; one gamma, S = 1: the paths that flatten B / up."""
    layer = _lora(segments=1) if kind == "lora" else _adapter()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 5, 12, dtype=torch.float64) if kind == "adapter" else None
    params = {name: non_contiguous(p.detach()).requires_grad_(True) for name, p in layer.named_parameters()}
    assert not all(p.is_contiguous() for p in params.values())
    y = torch.func.functional_call(layer, params, (x,) if residual is None else (x, residual))
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, list(params.values()), grad_y)
    with python_routes():
        want = torch.autograd.grad(torch.func.functional_call(layer, params, (x,) if residual is None else
                                                              (x, residual)), list(params.values()), grad_y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
