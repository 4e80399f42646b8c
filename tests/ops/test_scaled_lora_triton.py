"""The ``triton`` backend of scaled LoRA on CPU, under the Triton interpreter, against a float64 oracle.

Triton decides interpreted vs compiled when a kernel is defined, and ``TRITON_INTERPRET=1`` must not leak
into GPU tests that share the pytest process, so the kernel tests run in a child pytest started with
``TRITON_INTERPRET=1`` (``test_interpreter_suite``); they are skipped in the parent. Run them directly with
``TRITON_INTERPRET=1 python -m pytest tests/ops/test_scaled_lora_triton.py``. The interpreter has no
bf16: fp32 (``input_precision="ieee"``) and fp16 here; bf16, large shapes and torch.compile are in
``tests/gpu/test_scaled_lora_triton_gpu.py``.
"""

import os

import pytest
import torch

import metapeft
from metapeft.ops import scaled_lora, select_backend
from metapeft.ops.scaled_lora_op import scaled_lora_fwd
from metapeft.reference import scaled_lora_reference
from tests.helpers.oracle import run_interpreter_suite
from tests.helpers.scaled_lora import GRANULARITIES, check_against_oracle, dropout_mask, kernels, make_inputs
from tests.helpers.triton_aot import compile_for_gpu

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interpreted = pytest.mark.interpreter

# (M, K, N, r, S): odd sizes, M in {1, 7, 97, 1000}, K, N in {40, 200, 768}, r in {1, 8, 64}, S in {1, 3}.
SHAPES = [
    (1, 40, 40, 1, 1),
    (7, 200, 768, 8, 3),
    (97, 40, 768, 1, 3),
    (97, 768, 200, 64, 1),
    (97, 200, 768, 64, 3),
    (1000, 200, 40, 8, 1),
]
DTYPES = {"f32": torch.float32, "f16": torch.float16}


def test_interpreter_suite():
    """Run this module's interpreter tests in a child process with TRITON_INTERPRET=1."""
    if INTERPRET:
        pytest.skip("already inside the interpreter run")
    run_interpreter_suite(__file__)


def test_cpu_tensors_need_the_interpreter():
    x = torch.randn(3, 8)
    if INTERPRET:
        assert select_backend("triton", x) == "triton"
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            select_backend("triton", x)
    assert select_backend("auto", x) == "torch", "'auto' must never pick triton for CPU tensors"
    with pytest.raises(RuntimeError, match="fp32/fp16/bf16.*float64"):
        select_backend("triton", x.double())


# fp32 on every shape; fp16 (slower in the interpreter) on M = 1, the multi-tile rank loop and M = 1000. A
# per-channel scale on fewer shapes: M = 1, S = 1 and 3, the multi-tile rank loop, M = 1000.
CASES = ([(shape, "f32", "segment") for shape in SHAPES] + [(SHAPES[i], "f16", "segment") for i in (0, 4, 5)]
         + [(SHAPES[i], "f32", "channel") for i in (1, 4, 5)] + [(SHAPES[i], "f16", "channel") for i in (0, 2)])


@interpreted
@pytest.mark.parametrize(("shape", "dtype_name", "granularity"), CASES, ids=lambda c: c if isinstance(c, str) else
                         "M{}_K{}_N{}_r{}_S{}".format(*c))
def test_matches_float64_oracle_by_2x_rule(shape, dtype_name, granularity):
    check_against_oracle(shape, DTYPES[dtype_name], bias=shape[0] % 2 == 1, granularity=granularity)


@interpreted
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_dropout_matches_oracle_built_from_the_kernel_mask(dtype_name, granularity):
    check_against_oracle((97, 200, 768, 8, 3), DTYPES[dtype_name], bias=True, dropout_p=0.3, seed=2**62 - 5,
                         granularity=granularity)


@interpreted
def test_dropout_mask_statistics_and_forward_agrees_with_the_mask_helper():
    M, K, p, seed = 300, 64, 0.3, 1234
    factors = dropout_mask(M, K, p, seed, torch.device("cpu"))
    kept = factors != 0
    assert torch.equal(factors[kept], torch.full_like(factors[kept], 1.0 / (1.0 - p)))
    sigma = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    assert abs(kept.float().mean(0) - (1 - p)).max() < 0.15, "columns must not share a mask pattern"
    assert torch.equal(factors, dropout_mask(M, K, p, seed, torch.device("cpu")))
    assert not torch.equal(factors, dropout_mask(M, K, p, seed + 1, torch.device("cpu")))
    # With A = identity, h = drop(x): the forward kernel must drop exactly what the helper says.
    x = torch.rand(M, K) + 1.0
    _, h = scaled_lora_fwd(x, torch.zeros(K, K), None, torch.eye(K), torch.zeros(K, K), torch.ones(1), p,
                           torch.tensor(seed), "triton")
    torch.testing.assert_close(h, x * factors, rtol=1e-6, atol=0)


@interpreted
def test_dropout_is_reproducible_from_the_seed():
    _, inputs = make_inputs(40, 24, 30, 4, 3, dtype=torch.float32)
    args = tuple(inputs.values())
    a = scaled_lora(*args, dropout_p=0.4, seed=7, backend="triton")
    b = scaled_lora(*args, dropout_p=0.4, seed=7, backend="triton")
    c = scaled_lora(*args, dropout_p=0.4, seed=8, backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(scaled_lora(*args, dropout_p=0.0, seed=7, backend="triton"),
                               scaled_lora_reference(*args), rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("needs", [(True, False, False, False, False, False), (False, False, False, True, True, False),
                                   (False, True, True, False, False, True)], ids=["dx", "dA_dB", "dW_db_dscale"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_backward_computes_only_what_is_needed(needs, granularity):
    M, K, N, r, S = 33, 40, 120, 4, 3
    _, inputs = make_inputs(M, K, N, r, S, dtype=torch.float32, granularity=granularity)
    x, weight, _, lora_A, lora_B, scale = inputs.values()
    grad_y = torch.randn(M, N)
    _, h = kernels().scaled_lora_fwd(x, weight, None, lora_A, lora_B, scale, 0.2, 3)
    fast = kernels().scaled_lora_bwd(grad_y, x, weight, lora_A, lora_B, scale, h, 0.2, 3, needs)
    every = kernels().scaled_lora_bwd(grad_y, x, weight, lora_A, lora_B, scale, h, 0.2, 3, (True,) * 6)
    for name, need, g, full in zip(("dx", "dweight", "dbias", "dA", "dB", "dscale"), needs, fast, every):
        if need:
            torch.testing.assert_close(g, full, rtol=0, atol=0, msg=name)
        else:
            assert g is None, name


@interpreted
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_opcheck(granularity):
    _, inputs = make_inputs(6, 20, 24, 2, 3, dtype=torch.float32, granularity=granularity)
    for k in ("x", "lora_A", "lora_B", "scale"):
        inputs[k].requires_grad_(True)
    args = (*inputs.values(), 0.25, torch.tensor(5), "triton")
    # aot_dispatch (compile) is checked on the GPU: torch.compile over the interpreter fails on fake tensors.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.metapeft.scaled_lora_fwd.default, args, test_utils=utils)
    h = torch.ops.metapeft.scaled_lora_fwd(*args)[1]
    bwd_args = (torch.randn(6, 24), inputs["x"].detach(), inputs["weight"], inputs["lora_A"].detach(),
                inputs["lora_B"].detach(), inputs["scale"].detach(), h, 0.25, torch.tensor(5), "triton",
                [True, False, True] * 2)
    torch.library.opcheck(torch.ops.metapeft.scaled_lora_bwd.default, bwd_args, test_utils=utils)


@interpreted
def test_launcher_errors_name_the_problem():
    _, inputs = make_inputs(5, 8, 6, 2, 1, dtype=torch.float32)
    x, weight, bias, lora_A, lora_B, scale = inputs.values()
    with pytest.raises(ValueError, match="inconsistent shapes"):
        kernels().scaled_lora_fwd(x, weight, bias, lora_A[:1], lora_B, scale, 0.0, 0)
    with pytest.raises(ValueError, match="M\\*K < 2\\*\\*31"):
        dropout_mask(2**20, 2**12, 0.1, 0, torch.device("cpu"))
    _, h = kernels().scaled_lora_fwd(x, weight, bias, lora_A, lora_B, scale, 0.0, 0)
    with pytest.raises(ValueError, match="grad_y must be"):
        kernels().scaled_lora_bwd(torch.randn(5, 7), x, weight, lora_A, lora_B, scale, h, 0.0, 0, (True,) * 6)


@interpreted
@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["p0", "p0.5"])
def test_create_graph_backward_matches_the_kernel_backward(dropout):
    _, inputs = make_inputs(20, 16, 12, 2, 3, dtype=torch.float32)
    leaves = [v.clone().requires_grad_(True) for v in inputs.values()]
    y = scaled_lora(*leaves, dropout_p=dropout, seed=3, backend="triton")
    first = torch.autograd.grad(y.sum(), leaves, retain_graph=True)
    differentiable = torch.autograd.grad(y.sum(), leaves, create_graph=True)
    for a, b in zip(first, differentiable):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# Constexprs of one representative variant of every kernel (the mask kernel's args need none beyond these).
AOT_CONSTEXPRS = {
    "_dropout_mask_kernel": dict(BLOCK_M=64, BLOCK_K=64),
    "_scaled_lora_h_kernel": dict(HAS_DROPOUT=True, BLOCK_M=64, BLOCK_R=32, BLOCK_K=64),
    "_scaled_lora_fwd_kernel": dict(HAS_BIAS=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=16, GROUP_M=8),
    "_scaled_lora_bwd_t_kernel": dict(PER_CHANNEL=False, BLOCK_M=64, BLOCK_N=64, BLOCK_R=16),
    "_scaled_lora_bwd_t_kernel[per_channel]": dict(PER_CHANNEL=True, BLOCK_M=64, BLOCK_N=64, BLOCK_R=16),
    "_scaled_lora_bwd_db_kernel": dict(STORE_DSCALE=False, BLOCK_M=64, BLOCK_N=64, BLOCK_R=16),
    "_scaled_lora_bwd_db_kernel[per_channel]": dict(STORE_DSCALE=True, BLOCK_M=64, BLOCK_N=64, BLOCK_R=16),
    "_scaled_lora_bwd_da_kernel": dict(HAS_DROPOUT=True, BLOCK_M=64, BLOCK_R=32, BLOCK_K=128),
    "_scaled_lora_bwd_dx_kernel": dict(HAS_DROPOUT=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=32, GROUP_M=8),
}


@pytest.mark.slow
@pytest.mark.skipif(INTERPRET, reason="compiles the kernels ahead of time: needs them as compiled JIT functions")
@pytest.mark.parametrize(("arch", "dtype"), [(90, "bf16"), (80, "fp32")], ids=["sm90_bf16", "sm80_fp32"])
@pytest.mark.parametrize("name", list(AOT_CONSTEXPRS))
def test_kernels_compile_for_the_gpu_without_one(name, arch, dtype):
    """Ahead-of-time compile to PTX/cubin for Hopper and Ampere: catches GPU-only lowering errors on a CPU machine."""
    from metapeft.ops.triton_backend import kernel_module

    kernel = getattr(kernel_module("common" if name == "_dropout_mask_kernel" else "scaled_lora"), name.split("[")[0])
    assert compile_for_gpu(kernel, AOT_CONSTEXPRS[name], arch, dtype), f"{name}: no cubin for sm_{arch}"


@interpreted
def test_fused_meta_lora_layer_on_the_triton_backend_matches_the_torch_backend():
    torch.manual_seed(0)
    base = torch.nn.Linear(40, 96)
    layers = {name: metapeft.FusedMetaLoRA(base, rank=4, segments=3, active_segments=(0, 2), backend=name)
              for name in ("torch", "triton")}
    with torch.no_grad():
        layers["torch"].lora_B.normal_()
        layers["torch"].modulator.normal_()
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(5, 16, 40)
    results = {}
    for name, layer in layers.items():
        leaf = x.clone().requires_grad_(True)
        y = layer(leaf)
        grads = torch.autograd.grad(y.square().sum(), [leaf, layer.lora_A, layer.lora_B, layer.modulator])
        assert layer.last_backend == name
        results[name] = (y, *grads)
    for a, b in zip(results["triton"], results["torch"]):  # fp32, two summation orders (values of order 1)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
