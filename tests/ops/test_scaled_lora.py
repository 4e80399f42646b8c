"""The scaled-LoRA op (torch backend) against a float64 oracle, gradcheck, opcheck and its contracts."""

import pytest
import torch

from metapeft.ops import scaled_lora
from metapeft.ops.dropout import dropout_keep_mask
from metapeft.ops.scaled_lora_op import scaled_lora_fwd
from metapeft.reference import scaled_lora_reference
from tests.helpers.oracle import HostReadCounter, assert_2x_rule, non_contiguous
from tests.helpers.scaled_lora import DTYPES, GRANULARITIES, SHAPES, forward_backward, make_inputs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}_S{}".format(*s))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_torch_backend_matches_float64_oracle_by_2x_rule(shape, dtype_name, granularity):
    dtype = DTYPES[dtype_name]
    inputs64, inputs = make_inputs(*shape, dtype=dtype, granularity=granularity)
    grad64 = torch.randn(shape[0], shape[2], dtype=torch.float64)
    grad_y = non_contiguous(grad64.to(dtype))
    torch.full((shape[0] * shape[2] * 4,), float("nan"), dtype=dtype)  # poison freed memory the op may reuse

    def fused(*args):
        return scaled_lora(*args, backend="torch")

    y_fast, g_fast = forward_backward(fused, inputs, grad_y, x_transform=non_contiguous)
    y_base, g_base = forward_backward(scaled_lora_reference, inputs, grad_y)
    y_ref, g_ref = forward_backward(scaled_lora_reference, inputs64, grad64)
    assert y_fast.dtype == dtype
    assert_2x_rule("y", y_fast, y_base, y_ref)
    for name in g_ref:
        assert_2x_rule(f"d{name}", g_fast[name], g_base[name], g_ref[name])


@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradcheck_float64(segments, bias, dropout, granularity):
    _, inputs = make_inputs(5, 7, 6, 2, segments, dtype=torch.float64, bias=bias, granularity=granularity)
    leaves = [v.requires_grad_(True) if v is not None else None for v in inputs.values()]
    leaves[-1] = leaves[-1].detach().double().requires_grad_(True)

    def op(x, weight, b, lora_A, lora_B, scale):
        return scaled_lora(x, weight, b, lora_A, lora_B, scale, dropout_p=dropout, seed=11, backend="torch")

    assert torch.autograd.gradcheck(op, tuple(leaves))
    assert torch.autograd.gradgradcheck(op, tuple(leaves))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_double_backward_matches_reference(granularity):
    _, inputs = make_inputs(9, 12, 15, 3, 3, dtype=torch.float64, granularity=granularity)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    args = tuple(leaves.values())
    v = torch.randn(9, 15, dtype=torch.float64)

    def hvp(fn):
        y = fn(*args)
        grads = torch.autograd.grad(y, args, v, create_graph=True)
        inner = sum((g * torch.ones_like(g).cumsum(0)).sum() for g in grads)
        return torch.autograd.grad(inner, args, allow_unused=True, materialize_grads=True)

    fused = hvp(lambda *a: scaled_lora(*a, backend="torch"))
    expected = hvp(scaled_lora_reference)
    for name, a, b in zip(leaves, fused, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"second derivative wrt {name}")


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_forward_mode_jvp_matches_reference(dropout, granularity):
    _, inputs = make_inputs(9, 12, 15, 3, 3, dtype=torch.float64, granularity=granularity)
    args = tuple(inputs.values())
    tangents = tuple(torch.randn_like(a) for a in args)
    _, fused = torch.func.jvp(lambda *a: scaled_lora(*a, dropout_p=dropout, seed=4, backend="torch"), args, tangents)
    _, expected = torch.func.jvp(lambda *a: scaled_lora_reference(*a, dropout_p=dropout, seed=4), args, tangents)
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_opcheck(segments, bias, granularity):
    _, inputs = make_inputs(6, 10, 12, 2, segments, dtype=torch.float32, bias=bias, granularity=granularity)
    for k in ("x", "lora_A", "lora_B", "scale"):
        inputs[k].requires_grad_(True)
    args = (*inputs.values(), 0.25, torch.tensor(5), "torch")
    torch.library.opcheck(torch.ops.metapeft.scaled_lora_fwd.default, args)
    grad_y = torch.randn(6, 12)
    h = torch.ops.metapeft.scaled_lora_fwd(*args)[1]
    bwd_args = (grad_y, inputs["x"].detach(), inputs["weight"], inputs["lora_A"].detach(), inputs["lora_B"].detach(),
                inputs["scale"].detach(), h, 0.25, torch.tensor(5), "torch", [True, False, bias, True, True, True])
    torch.library.opcheck(torch.ops.metapeft.scaled_lora_bwd.default, bwd_args)


def test_op_never_reads_scale_on_host():
    _, inputs = make_inputs(8, 16, 18, 2, 3, dtype=torch.float32)
    leaves = [v.requires_grad_(True) for v in inputs.values()]
    with HostReadCounter() as counter:
        y, _ = scaled_lora_fwd(*leaves, 0.0, None, "torch")
        y.sum().backward()
    assert counter.count == 0


@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["p0", "p0.5"])  # autograd through the forward / the Function
def test_no_output_sized_tensor_or_mask_saved_for_backward(dropout):
    M, K, N = 64, 32, 96
    _, inputs = make_inputs(M, K, N, 4, 3, dtype=torch.float32)
    for k in ("x", "lora_A", "lora_B", "scale"):
        inputs[k].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        scaled_lora(*inputs.values(), dropout_p=dropout, seed=3, backend="torch")
    assert saved, "the op saved nothing, so this test checks nothing"
    assert all(t.dtype != torch.bool for t in saved), "a dropout mask was saved"
    assert all(t.numel() < M * N for t in saved), [tuple(t.shape) for t in saved]


def test_channel_scale_equals_per_segment_scale_repeated_over_the_segments():
    """A per-channel scale whose values repeat a per-segment one gives that op's output and, summed per segment,
    its scale gradient (the two granularities agree where they mean the same)."""
    _, inputs = make_inputs(11, 12, 15, 3, 3, dtype=torch.float64)
    channel = {**inputs, "scale": inputs["scale"].double().repeat_interleave(5)}
    grad_y = torch.randn(11, 15, dtype=torch.float64)
    y_seg, g_seg = forward_backward(lambda *a: scaled_lora(*a, backend="torch"), inputs, grad_y)
    y_ch, g_ch = forward_backward(lambda *a: scaled_lora(*a, backend="torch"), channel, grad_y)
    torch.testing.assert_close(y_ch, y_seg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ch["scale"].view(3, 5).sum(1), g_seg["scale"].double(), rtol=1e-6, atol=1e-6)
    for name in ("x", "lora_A", "lora_B"):
        torch.testing.assert_close(g_ch[name], g_seg[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("length", [2, 14, 16], ids=lambda n: f"len{n}")
def test_a_scale_neither_per_segment_nor_per_channel_is_refused(length):
    _, inputs = make_inputs(4, 12, 15, 3, 3, dtype=torch.float32)
    inputs["scale"] = torch.ones(length)
    with pytest.raises(ValueError, match=r"scale must have shape \(segments,\) = \(3,\).* = \(15,\)"):
        scaled_lora(*inputs.values(), backend="torch")


class TestDropout:
    def test_same_seed_same_output_and_p0_equals_no_dropout(self):
        _, inputs = make_inputs(50, 24, 30, 4, 3, dtype=torch.float32)
        args = tuple(inputs.values())
        a = scaled_lora(*args, dropout_p=0.4, seed=7, backend="torch")
        b = scaled_lora(*args, dropout_p=0.4, seed=7, backend="torch")
        c = scaled_lora(*args, dropout_p=0.4, seed=8, backend="torch")
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c)
        torch.testing.assert_close(scaled_lora(*args, dropout_p=0.0, seed=7, backend="torch"),
                                   scaled_lora_reference(*args), rtol=1e-5, atol=1e-5)

    def test_backward_uses_the_forward_mask(self):
        inputs64, _ = make_inputs(40, 20, 30, 4, 3, dtype=torch.float64)
        grad_y = torch.randn(40, 30, dtype=torch.float64)

        def fused(*args):
            return scaled_lora(*args, dropout_p=0.5, seed=123, backend="torch")

        def reference(*args):
            return scaled_lora_reference(*args, dropout_p=0.5, seed=123)

        y_fast, g_fast = forward_backward(fused, inputs64, grad_y)
        y_ref, g_ref = forward_backward(reference, inputs64, grad_y)
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-12, atol=1e-12)
        for name in g_ref:
            torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-10, atol=1e-10, msg=name)

    def test_mask_statistics(self):
        K = 64
        x = torch.rand(2000, K) + 1.0
        lora_A = torch.eye(K)  # h = drop(x) exactly
        weight, lora_B, scale = torch.zeros(K, K), torch.zeros(K, K), torch.ones(1)
        p = 0.3
        _, h = scaled_lora_fwd(x, weight, None, lora_A, lora_B, scale, p, torch.tensor(99), "torch")
        kept = h != 0
        n = kept.numel()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
        torch.testing.assert_close(h[kept], (x / (1 - p))[kept])
        keep = dropout_keep_mask((2000, K), p, 99, torch.device("cpu"))
        assert torch.equal(keep, kept)
