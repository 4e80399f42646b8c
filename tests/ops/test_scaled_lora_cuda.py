"""The ``cuda`` backend (``metapeft._C`` from ``csrc/``): op schemas, the C++ argument checks and host code
through the library's CPU kernels, and (``gpu`` marker) the CUDA kernels against a float64 oracle.

The C++ ops ``metapeft::scaled_lora_fwd_cuda`` / ``_bwd_cuda`` are registered for CPU and CUDA with one
device-generic host function (ATen GEMMs) plus two small passes (seeded dropout, the fused rank-space
reduction) that have a CPU loop and a CUDA kernel; CPU tests therefore check everything but the CUDA
kernels themselves. Every test here needs the extension built (``pip install -e .`` with a CUDA toolkit).
"""

import re

import pytest
import torch

from metapeft.build_info import arch_runs_on, build_info, main
from metapeft.ops import available_backends, scaled_lora, select_backend
from metapeft.ops.cuda_backend import EXTENSION_ERROR
from tests.helpers.oracle import non_contiguous
from tests.helpers.scaled_lora import DTYPES, GRANULARITIES, SHAPES, check_against_oracle, make_inputs

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))

OPS = torch.ops.metapeft
FWD_SCHEMA = ("metapeft::scaled_lora_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
              "Tensor scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)")
BWD_SCHEMA = ("metapeft::scaled_lora_bwd_cuda(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
              "Tensor scale, Tensor h, float dropout_p, Tensor? seed, bool[6] needs) "
              "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "scale")
GPU_SHAPES = [*SHAPES, (4099, 200, 768, 8, 3), (2048, 768, 2304, 64, 3)]  # > 32 reduction chunks; ViT-B qkv


class ExtensionOp(torch.autograd.Function):
    """The C++ forward and backward wired into autograd (the core op does this for CUDA tensors)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
        seed = torch.tensor(seed, device=x.device)
        y, h = OPS.scaled_lora_fwd_cuda(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
        ctx.save_for_backward(x, weight, lora_A, lora_B, scale, h)
        ctx.dropout_p, ctx.seed, ctx.has_bias = dropout_p, seed, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, scale, h = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:6])
        grads = OPS.scaled_lora_bwd_cuda(grad_y, x, weight, lora_A, lora_B, scale, h, ctx.dropout_p, ctx.seed, needs)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None)


def extension_op(dropout_p=0.0, seed=0):
    def run(x, weight, bias, lora_A, lora_B, scale):
        return ExtensionOp.apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)

    return run


def public_op(dropout_p=0.0, seed=0):
    def run(x, weight, bias, lora_A, lora_B, scale):
        return scaled_lora(x, weight, bias, lora_A, lora_B, scale, dropout_p=dropout_p, seed=seed, backend="cuda")

    return run


def keep_factors(M, K, p, seed, device):
    """The library's dropout factors (0 or 1/(1-p)) for an (M, K) input, in float64."""
    return OPS.seeded_dropout_cuda(torch.ones(M, K, dtype=torch.float64, device=device), p,
                                   torch.tensor(seed, device=device))


def test_extension_registers_the_op_schemas():
    assert str(OPS.scaled_lora_fwd_cuda.default._schema) == FWD_SCHEMA
    assert str(OPS.scaled_lora_bwd_cuda.default._schema) == BWD_SCHEMA
    assert str(OPS.seeded_dropout_cuda.default._schema) == (
        "metapeft::seeded_dropout_cuda(Tensor x, float p, Tensor seed) -> Tensor")
    for op in (OPS.scaled_lora_fwd_cuda, OPS.scaled_lora_bwd_cuda):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), key), (op, key)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}_S{}".format(*s))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cpu_kernels_match_float64_oracle_by_2x_rule(shape, dtype_name, granularity):
    check_against_oracle(shape, DTYPES[dtype_name], op=extension_op, mask=keep_factors, granularity=granularity)


@pytest.mark.parametrize("dtype_name", ["f64", "f32", "bf16"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cpu_dropout_matches_oracle_built_from_the_mask(dtype_name, granularity):
    dtype = {"f64": torch.float64, **DTYPES}[dtype_name]
    check_against_oracle((97, 200, 120, 8, 3), dtype, dropout_p=0.3, seed=123, op=extension_op, mask=keep_factors,
                         granularity=granularity)


@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradcheck_float64(segments, dropout, granularity):
    _, inputs = make_inputs(5, 7, 6, 2, segments, dtype=torch.float64, granularity=granularity)
    leaves = [v.detach().double().requires_grad_(True) for v in inputs.values()]
    assert torch.autograd.gradcheck(extension_op(dropout, 11), leaves)


def test_dropout_mask_statistics_reproducibility_and_layout_independence():
    x = torch.randn(300, 257)
    seed7 = torch.tensor(7)
    out = OPS.seeded_dropout_cuda(x, 0.25, seed7)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.75) < 4 * (0.75 * 0.25 / x.numel()) ** 0.5
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert torch.equal(out, OPS.seeded_dropout_cuda(x, 0.25, seed7))
    assert not torch.equal(kept, OPS.seeded_dropout_cuda(x, 0.25, torch.tensor(8)) != 0)
    assert torch.equal(out, OPS.seeded_dropout_cuda(non_contiguous(x), 0.25, seed7))
    assert torch.equal(OPS.seeded_dropout_cuda(x, 0.0, seed7), x)


def test_empty_batch():
    _, inputs = make_inputs(7, 40, 48, 4, 3, dtype=torch.float32)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    y = extension_op(0.1, 2)(leaves["x"][:0], *list(leaves.values())[1:])
    assert y.shape == (0, 48)
    y.sum().backward()
    assert torch.equal(leaves["scale"].grad, torch.zeros(3)) and torch.equal(leaves["lora_B"].grad, torch.zeros(48, 4))


@pytest.mark.parametrize("needs", [(True, False, False, False, False, False), (False, False, False, True, True, True),
                                   (False, True, True, False, False, False)], ids=["dx", "lora", "base"])
def test_backward_returns_empty_tensors_for_unneeded_gradients(needs):
    _, inputs = make_inputs(7, 40, 201, 4, 3, dtype=torch.float32)
    y, h = OPS.scaled_lora_fwd_cuda(*inputs.values(), 0.0, None)
    grads = OPS.scaled_lora_bwd_cuda(torch.randn_like(y), *(inputs[k] for k in NAMES if k != "bias"), h, 0.0, None,
                                     list(needs))
    expected = {"x": (7, 40), "weight": (201, 40), "bias": (201,), "lora_A": (12, 40), "lora_B": (201, 4),
                "scale": (3,)}
    for name, grad, need in zip(NAMES, grads, needs):
        assert tuple(grad.shape) == (expected[name] if need else (0,)), name
    assert grads[5].dtype == inputs["scale"].dtype


@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_opcheck(segments, granularity):
    _, inputs = make_inputs(7, 40, 48, 4, segments, dtype=torch.float32, granularity=granularity)
    fwd_args = (*inputs.values(), 0.2, torch.tensor(5))
    torch.library.opcheck(OPS.scaled_lora_fwd_cuda.default, fwd_args)
    y, h = OPS.scaled_lora_fwd_cuda(*fwd_args)
    bwd_args = (torch.randn_like(y), *(inputs[k] for k in NAMES if k != "bias"), h, 0.2, torch.tensor(5), [True] * 6)
    torch.library.opcheck(OPS.scaled_lora_bwd_cuda.default, bwd_args)
    torch.library.opcheck(OPS.seeded_dropout_cuda.default, (inputs["x"], 0.2, torch.tensor(5)))


def _bad_fwd_inputs():
    """(id, field overrides, dropout_p, substring the error must contain)."""
    return [
        ("x_1d", {"x": torch.randn(40)}, 0.0, "x must be 2-D"),
        ("x_int", {"x": torch.ones(7, 40, dtype=torch.int64)}, 0.0, "x must be a floating-point"),
        ("weight_dtype", {"weight": torch.randn(48, 40, dtype=torch.float64)}, 0.0, "weight has dtype"),
        ("in_features", {"x": torch.randn(7, 41)}, 0.0, "x's last dimension (41)"),
        ("scale_length", {"scale": torch.rand(5)}, 0.0, "scale must have shape (3,) (one per segment) or (48,)"),
        ("segments", {"lora_A": torch.randn(20, 40)}, 0.0, "lora_A holds 5 segments"),
        ("scale_2d", {"scale": torch.rand(3, 1)}, 0.0, "scale must be 1-D"),
        ("rank_0", {"lora_A": torch.randn(0, 40), "lora_B": torch.randn(48, 0)}, 0.0, "rank (lora_B's columns)"),
        ("rank_big", {"lora_A": torch.randn(51, 40), "lora_B": torch.randn(48, 17)}, 0.0, "rank (lora_B's columns)"),
        ("lora_A_shape", {"lora_A": torch.randn(12, 39)}, 0.0, "lora_A must have shape (12, 40)"),
        ("lora_B_rows", {"lora_B": torch.randn(47, 4)}, 0.0, "lora_B must have shape (48, 4)"),
        ("bias_shape", {"bias": torch.randn(47)}, 0.0, "bias must have shape (48,)"),
        ("dropout", {}, 1.0, "dropout_p must be in [0, 1)"),
    ]


@pytest.mark.parametrize("overrides,dropout_p,message", [c[1:] for c in _bad_fwd_inputs()],
                         ids=[c[0] for c in _bad_fwd_inputs()])
def test_forward_checks_name_the_bad_argument(overrides, dropout_p, message):
    _, inputs = make_inputs(7, 40, 48, 4, 3, dtype=torch.float32)
    inputs.update(overrides)
    with pytest.raises(RuntimeError) as info:
        OPS.scaled_lora_fwd_cuda(*inputs.values(), dropout_p, torch.tensor(0))
    assert message in str(info.value)


@pytest.mark.parametrize("field,bad,message", [
    ("grad_y", torch.randn(7, 47), "grad_y must have shape (7, 48)"),
    ("grad_y", torch.randn(7, 48, dtype=torch.float16), "grad_y has dtype"),
    ("h", torch.randn(7, 11), "h must have shape (7, 12)"),
], ids=["grad_y_shape", "grad_y_dtype", "h_shape"])
def test_backward_checks_name_the_bad_argument(field, bad, message):
    _, inputs = make_inputs(7, 40, 48, 4, 3, dtype=torch.float32)
    y, h = OPS.scaled_lora_fwd_cuda(*inputs.values(), 0.0, None)
    args = {"grad_y": torch.randn_like(y), **{k: inputs[k] for k in NAMES if k != "bias"}, "h": h, field: bad}
    with pytest.raises(RuntimeError) as info:
        OPS.scaled_lora_bwd_cuda(*args.values(), 0.0, None, [True] * 6)
    assert message in str(info.value)


def test_backend_reports_why_it_cannot_run_here():
    reason = available_backends()["cuda"]
    x = torch.randn(3, 4)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in reason
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this input"):
        select_backend("cuda", x)
    assert select_backend("auto", x) != "cuda"


def test_build_info_reports_the_extension_and_backends(capsys):
    info = build_info()
    ext = info["extension"]
    assert ext["built"] and ext["path"].endswith(".so")
    assert torch.__version__.startswith(ext["torch"])
    assert ext["cuda"].split(".")[0] == torch.version.cuda.split(".")[0]
    assert ext["arch_list"] and all(re.fullmatch(r"\d+\.\d+(\+PTX)?", arch) for arch in ext["arch_list"])
    assert set(info["backends"]) == {"cuda", "triton", "torch"} and info["backends"]["torch"] is None
    assert main([]) == 0
    report = capsys.readouterr().out
    assert f"extension metapeft._C: built for torch {ext['torch']}" in report
    assert f"cuda    {'available' if info['backends']['cuda'] is None else 'unavailable: '}" in report


@pytest.mark.parametrize("arch,capability,runs", [("9.0", (9, 0), True), ("8.0", (8, 6), True), ("8.0", (9, 0), False),
                                                  ("8.0+PTX", (9, 0), True), ("9.0", (8, 9), False)])
def test_arch_coverage(arch, capability, runs):
    assert arch_runs_on(arch, capability) is runs

@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}_S{}".format(*s))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cuda_backend_matches_float64_oracle_by_2x_rule(shape, dtype_name, granularity):
    check_against_oracle(shape, DTYPES[dtype_name], device="cuda", op=public_op, mask=keep_factors,
                         granularity=granularity)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_cuda_dropout_matches_oracle_built_from_the_mask(dtype_name):
    check_against_oracle((1000, 200, 768, 16, 3), DTYPES[dtype_name], dropout_p=0.1, seed=3, device="cuda",
                         op=public_op, mask=keep_factors)


@pytest.mark.gpu
def test_cuda_and_cpu_kernels_draw_the_same_mask_and_reduce_deterministically():
    x = torch.randn(1001, 203)
    assert torch.equal(OPS.seeded_dropout_cuda(x.cuda(), 0.3, torch.tensor(99, device="cuda")).cpu(),
                       OPS.seeded_dropout_cuda(x, 0.3, torch.tensor(99)))
    _, inputs = make_inputs(4099, 200, 768, 8, 3, dtype=torch.bfloat16, device="cuda")
    y, h = OPS.scaled_lora_fwd_cuda(*inputs.values(), 0.0, None)
    args = (torch.randn_like(y), *(inputs[k] for k in NAMES if k != "bias"), h, 0.0, None, [False] * 5 + [True])
    assert torch.equal(OPS.scaled_lora_bwd_cuda(*args)[5], OPS.scaled_lora_bwd_cuda(*args)[5])


@pytest.mark.gpu
def test_cuda_backend_on_a_second_stream_and_empty_batch():
    _, inputs = make_inputs(33, 96, 192, 8, 3, dtype=torch.float16, device="cuda")
    expected = scaled_lora(*inputs.values(), dropout_p=0.2, seed=4, backend="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_stream = scaled_lora(*inputs.values(), dropout_p=0.2, seed=4, backend="cuda")
    stream.synchronize()
    assert torch.equal(on_stream, expected)
    empty = scaled_lora(inputs["x"][:0], *list(inputs.values())[1:], dropout_p=0.2, backend="cuda")
    assert empty.shape == (0, 192)


@pytest.mark.gpu
@pytest.mark.parametrize("field", ["weight", "scale"])
def test_cuda_op_rejects_an_argument_on_another_device(field):
    _, inputs = make_inputs(7, 40, 48, 4, 3, dtype=torch.float32, device="cuda")
    inputs[field] = inputs[field].cpu()
    with pytest.raises(RuntimeError) as info:
        OPS.scaled_lora_fwd_cuda(*inputs.values(), 0.0, None)
    assert f"{field} is on cpu but x is on cuda" in str(info.value)
