"""The ``triton`` backend of the adapter op on CPU, under the Triton interpreter, against a float64 oracle.

As in ``test_scaled_lora_triton.py``, the kernel tests run in a child pytest started with ``TRITON_INTERPRET=1``
(``test_interpreter_suite``) and are skipped in the parent. Run them directly with
``TRITON_INTERPRET=1 python -m pytest tests/ops/test_adapter_triton.py``. The interpreter has no bf16: fp32
(``input_precision="ieee"``) and fp16 here.
"""

import os

import pytest
import torch

import metapeft
from metapeft.ops import select_backend
from metapeft.ops.adapter_op import adapter, adapter_fwd
from metapeft.reference import adapter_reference
from tests.helpers.adapter import NAMES, forward_backward, make_inputs
from tests.helpers.oracle import assert_2x_rule, non_contiguous, run_interpreter_suite
from tests.helpers.scaled_lora import dropout_mask
from tests.helpers.triton_aot import compile_for_gpu

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interpreted = pytest.mark.interpreter
compiled = pytest.mark.skipif(INTERPRET, reason="compiled kernels; the interpreter child runs on CPU")

# (M, D, b, kind, activation, dtype): M in {1, 7, 97, 1000}, D not a multiple of 16 and above one D tile,
# b in 1..256, both residual forms and activations, each in fp32 and/or fp16.
SHAPES = [
    (1, 40, 1, "parallel", "relu", "f32"),
    (7, 200, 8, "sequential", "gelu", "f16"),
    (97, 300, 64, "parallel", "gelu", "f32"),
    (97, 300, 64, "parallel", "gelu", "f16"),
    (97, 72, 256, "sequential", "relu", "f16"),
    (1000, 40, 16, "sequential", "gelu", "f32"),
    (1000, 40, 16, "parallel", "relu", "f16"),
]
DTYPES = {"f32": torch.float32, "f16": torch.float16}


def kernels():
    """The kernel module, imported only inside the interpreter child."""
    from metapeft.ops.triton_backend import kernel_module

    return kernel_module("adapter")


def triton_op(activation, dropout_p=0.0, seed=0):
    def run(*args):
        return adapter(*args, activation=activation, dropout_p=dropout_p, seed=seed, backend="triton")

    return run


def dropout_oracle(factors, activation):
    """The adapter whose branch sees ``x * factors`` (the kernel's dropout mask), in factors' dtype."""

    def run(x, residual, *weights):
        return adapter_reference(x * factors, x if residual is None else residual, *weights, activation=activation)

    return run


def check_against_oracle(M, D, b, kind, activation, dtype, dropout_p=0.0, seed=0, device="cpu", channel=False):
    """Forward and every gradient of the triton op vs float64 by the 2x rule (non-contiguous x and dOut); the scale
    (1,) or, with ``channel``, (D,)."""
    inputs64, inputs = make_inputs(M, D, b, dtype=dtype, residual=kind == "parallel", device=device, channel=channel)
    grad_out = torch.randn(M, D, dtype=dtype, device=device)
    if dropout_p > 0.0:
        factors = dropout_mask(M, D, dropout_p, seed, device).double()
        oracle, baseline = dropout_oracle(factors, activation), dropout_oracle(factors.to(dtype), activation)
    else:
        def oracle(*args):
            return adapter_reference(*args, activation=activation)
        baseline = oracle
    for _ in range(4):  # poison freed memory so that outputs the kernels fail to write show up as NaN
        torch.full((M * D * 2,), float("nan"), dtype=dtype, device=device)
    y_fast, g_fast = forward_backward(triton_op(activation, dropout_p, seed), inputs, non_contiguous(grad_out),
                                      non_contiguous)
    y_base, g_base = forward_backward(baseline, inputs, grad_out)
    y_ref, g_ref = forward_backward(oracle, inputs64, grad_out.double())
    assert y_fast.dtype == dtype
    assert_2x_rule("out", y_fast, y_base, y_ref)
    assert set(g_fast) == set(g_ref)
    g_base["scale"] = g_base["scale"].to(dtype)  # the unfused d scale is computed in x's dtype (see test_adapter)
    for name in g_ref:
        assert g_fast[name].dtype == inputs[name].dtype, name
        assert_2x_rule(f"d{name}", g_fast[name], g_base[name], g_ref[name])


def test_interpreter_suite():
    """Run this module's interpreter tests in a child process with TRITON_INTERPRET=1."""
    if INTERPRET:
        pytest.skip("already inside the interpreter run")
    run_interpreter_suite(__file__)


def test_auto_never_picks_triton_for_cpu_tensors():
    x = torch.randn(3, 8)
    assert select_backend("auto", x, "adapter") == "torch"
    if not INTERPRET:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            select_backend("triton", x, "adapter")


# A per-channel scale (D,) on M = 1, both residual forms, a wide bottleneck, fp32 and fp16.
CHANNEL_CASES = [(SHAPES[i], True) for i in (0, 1, 3, 4, 5)]


@interpreted
@pytest.mark.parametrize(("shape", "channel"), [(shape, False) for shape in SHAPES] + CHANNEL_CASES,
                         ids=lambda s: ("channel" if s else "scalar") if isinstance(s, bool) else
                         "M{}_D{}_b{}_{}_{}_{}".format(*s))
def test_matches_float64_oracle_by_2x_rule(shape, channel):
    *shape, dtype_name = shape
    check_against_oracle(*shape, DTYPES[dtype_name], channel=channel)


@interpreted
@pytest.mark.parametrize("kind,dtype_name", [("parallel", "f16"), ("sequential", "f32")])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_dropout_matches_oracle_built_from_the_kernel_mask(kind, dtype_name, channel):
    check_against_oracle(97, 200, 8, kind, "gelu", DTYPES[dtype_name], dropout_p=0.3, seed=2**62 - 5, channel=channel)


@interpreted
def test_forward_kernel_drops_exactly_the_shared_mask_and_seed_reproduces():
    M, D, p, seed = 150, 64, 0.3, 1234
    x = torch.rand(M, D) + 1.0
    eye, zeros = torch.eye(D), torch.zeros(D, D)
    # down = identity and relu on positive inputs: z = drop(x) exactly.
    _, z = adapter_fwd(x, None, eye, None, zeros, None, torch.ones(1), "relu", p, torch.tensor(seed), "triton")
    torch.testing.assert_close(z, x * dropout_mask(M, D, p, seed), rtol=1e-6, atol=0)
    _, inputs = make_inputs(40, 24, 4, dtype=torch.float32)
    args = tuple(inputs[k] for k in NAMES)
    a = adapter(*args, dropout_p=0.4, seed=7, backend="triton")
    torch.testing.assert_close(a, adapter(*args, dropout_p=0.4, seed=7, backend="triton"), rtol=0, atol=0)
    assert not torch.allclose(a, adapter(*args, dropout_p=0.4, seed=8, backend="triton"))


@interpreted
@pytest.mark.parametrize("needs", [(True, False, False, False, False, False), (False, True, True, False, False, False),
                                   (False, False, False, True, True, True)], ids=["dx", "down", "up_dscale"])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_backward_computes_only_what_is_needed(needs, channel):
    _, inputs = make_inputs(33, 40, 4, dtype=torch.float32, residual=False, channel=channel)
    x, _, down_w, down_b, up_w, up_b, scale = (inputs[k] for k in NAMES)
    grad_out = torch.randn(33, 40)
    _, z = kernels().adapter_fwd(x, None, down_w, down_b, up_w, up_b, scale, "gelu", 0.2, 3)
    args = (grad_out, x, down_w, up_w, up_b, scale, z, "gelu", 0.2, 3, True)
    fast = kernels().adapter_bwd(*args, needs)
    every = kernels().adapter_bwd(*args, (True,) * 6)
    for name, need, g, full in zip(("dx", "ddown_w", "ddown_b", "dup_w", "dup_b", "dscale"), needs, fast, every):
        if need:
            torch.testing.assert_close(g, full, rtol=0, atol=0, msg=name)
        else:
            assert g is None, name


@interpreted
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_opcheck(channel):
    _, inputs = make_inputs(6, 20, 3, dtype=torch.float32, channel=channel)
    for k in ("x", "down_weight", "up_weight", "scale"):
        inputs[k].requires_grad_(True)
    args = (*(inputs[k] for k in NAMES), "relu", 0.25, torch.tensor(5), "triton")
    # aot_dispatch (the slow one: it reruns the kernels under several tracers) is backend-independent and runs in
    # test_adapter.py; here the triton impl's outputs must match the fake kernels and the schema.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.metapeft.adapter_fwd.default, args, test_utils=utils)
    z = torch.ops.metapeft.adapter_fwd(*args)[1]
    detached = {k: None if v is None else v.detach() for k, v in inputs.items()}
    weights = (detached["down_weight"], detached["up_weight"], detached["up_bias"], detached["scale"])
    bwd_args = (torch.randn(6, 20), detached["x"], *weights, z, "relu", 0.25, torch.tensor(5), False, "triton",
                [True] * 6)
    torch.library.opcheck(torch.ops.metapeft.adapter_bwd.default, bwd_args, test_utils=utils)


@interpreted
def test_layer_runs_on_triton_and_matches_torch():
    layer = metapeft.FusedMetaAdapter(40, 8, alpha=0.5, kind="sequential", activation="gelu", backend="triton")
    with torch.no_grad():
        layer.up_weight.normal_()
    x = torch.randn(2, 9, 40, requires_grad=True)
    out = layer(x)
    assert layer.last_backend == "triton"
    grads = torch.autograd.grad(out.sum(), (x, layer.modulator, layer.down_weight))
    layer.backend = "torch"
    out_torch = layer(x)
    expected = torch.autograd.grad(out_torch.sum(), (x, layer.modulator, layer.down_weight))
    torch.testing.assert_close(out, out_torch, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@interpreted
@pytest.mark.parametrize("kind", ["parallel", "sequential"])
@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["p0", "p0.5"])
def test_create_graph_backward_matches_the_kernel_backward(kind, dropout):
    _, inputs = make_inputs(20, 24, 4, dtype=torch.float32, residual=kind == "parallel")
    leaves = [None if inputs[k] is None else inputs[k].clone().requires_grad_(True) for k in NAMES]
    out = adapter(*leaves, activation="gelu", dropout_p=dropout, seed=3, backend="triton")
    tensors = [t for t in leaves if t is not None]
    first = torch.autograd.grad(out.sum(), tensors, retain_graph=True)
    differentiable = torch.autograd.grad(out.sum(), tensors, create_graph=True)
    for a, b in zip(first, differentiable):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@interpreted
def test_launcher_errors_name_the_problem():
    _, inputs = make_inputs(5, 8, 3, dtype=torch.float32)
    x, residual, down_w, down_b, up_w, up_b, scale = (inputs[k] for k in NAMES)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        kernels().adapter_fwd(x, residual, down_w, down_b, up_w[:, :2], up_b, scale, "relu", 0.0, 0)
    wide = torch.randn(300, 8)
    with pytest.raises(ValueError, match="bottlenecks 1..256, got 300"):
        kernels().adapter_fwd(x, None, wide, None, wide.t(), None, scale, "relu", 0.0, 0)
    _, z = kernels().adapter_fwd(x, residual, down_w, down_b, up_w, up_b, scale, "relu", 0.0, 0)
    with pytest.raises(ValueError, match="grad_out must be"):
        kernels().adapter_bwd(torch.randn(5, 7), x, down_w, up_w, up_b, scale, z, "relu", 0.0, 0, False, (True,) * 6)


# ViT-B/16 shapes (batch 8: M = 8 * 197 tokens; D = 768) and a ragged one, bottlenecks 8 / 64 / 256.
GPU_SHAPES = [(1576, 768, 64, "parallel", "relu"), (1576, 768, 8, "sequential", "gelu"),
              (1000, 200, 256, "parallel", "gelu")]
GPU_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "M{}_D{}_b{}_{}_{}".format(*s))
@pytest.mark.parametrize("dtype_name", list(GPU_DTYPES))
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("channel", [False, True], ids=["scalar", "channel"])
def test_gpu_matches_float64_oracle_by_2x_rule(shape, dtype_name, dropout_p, channel):
    check_against_oracle(*shape, GPU_DTYPES[dtype_name], dropout_p=dropout_p, seed=17, device="cuda", channel=channel)


@pytest.mark.gpu
@compiled
def test_gpu_auto_picks_triton_and_compiles_without_graph_breaks():
    layer = metapeft.FusedMetaAdapter(768, 64, alpha=0.5, kind="sequential", activation="gelu").cuda()
    with torch.no_grad():
        layer.up_weight.normal_()
    x = torch.randn(4, 197, 768, device="cuda", requires_grad=True)
    out = torch.compile(layer, fullgraph=True)(x)
    assert layer.last_backend == "triton"
    out.sum().backward()
    expected = adapter_reference(x, None, layer.down_weight, layer.down_bias, layer.up_weight, layer.up_bias,
                                 layer.scale(), "gelu")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert layer.modulator.grad is not None and torch.isfinite(layer.modulator.grad).all()


# The widest tiles the launchers use (metapeft/kernels/adapter.py: _bottleneck_block, _row_block), every feature on,
# with the autotuner's largest BLOCK_D and both warp counts: where register pressure is highest.
AOT_VARIANTS = {
    "b64_8warps": (dict(BLOCK_M=64, BLOCK_B=64, BLOCK_D=128), 8),
    "b256_4warps": (dict(BLOCK_M=32, BLOCK_B=256, BLOCK_D=128), 4),
}
AOT_FEATURES = dict(HAS_DOWN_BIAS=True, HAS_UP_BIAS=True, ACTIVATION=1, HAS_DROPOUT=True, RESIDUAL_IS_X=False,
                    NEED_DX=True, NEED_COLSUM=True)


@pytest.mark.slow
@compiled
@pytest.mark.parametrize(("arch", "dtype"), [(90, "bf16"), (80, "fp32")], ids=["sm90_bf16", "sm80_fp32"])
@pytest.mark.parametrize("variant", list(AOT_VARIANTS))
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
@pytest.mark.parametrize("name", ["_adapter_fwd_kernel", "_adapter_bwd_kernel"])
def test_kernels_compile_for_the_gpu_without_one(name, per_channel, variant, arch, dtype):
    """Ahead-of-time compile to PTX/cubin for Hopper and Ampere: catches GPU-only lowering errors on a CPU machine."""
    from metapeft.ops.triton_backend import kernel_module

    tiles, warps = AOT_VARIANTS[variant]
    kernel = getattr(kernel_module("adapter"), name)
    features = {**AOT_FEATURES, **tiles, "PER_CHANNEL": per_channel}
    assert compile_for_gpu(kernel, features, arch, dtype, warps), f"{name}: no cubin for sm_{arch}"
