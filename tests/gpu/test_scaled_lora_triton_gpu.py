"""The ``triton`` backend of scaled LoRA on a CUDA GPU: bf16, large shapes, torch.compile, no host syncs.

Compiled kernels (never the interpreter): run this file in a process without ``TRITON_INTERPRET``.
"""

import pytest
import torch

import metapeft
from metapeft.ops import scaled_lora, select_backend
from tests.helpers.scaled_lora import GRANULARITIES, check_against_oracle, dropout_mask, kernels, make_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.gpu

# (M, K, N, r, S): ViT-B qkv / fc1 and ViT-L fc1 sizes, odd tails, ranks 1..256.
SHAPES = [
    (1, 40, 40, 1, 1),
    (97, 200, 768, 8, 3),
    (1000, 768, 200, 64, 1),
    (4096, 768, 2304, 16, 3),
    (3152, 768, 3072, 8, 1),
    (16384, 1024, 4096, 64, 1),
    (2048, 1024, 3072, 256, 3),
    (4099, 1000, 1002, 32, 3),
]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}_S{}".format(*s))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_matches_float64_oracle_by_2x_rule(shape, dtype_name, granularity):
    check_against_oracle(shape, DTYPES[dtype_name], bias=shape[0] % 2 == 1, device="cuda", granularity=granularity)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_dropout_matches_oracle_built_from_the_kernel_mask(dtype_name):
    check_against_oracle((4096, 768, 2304, 16, 3), DTYPES[dtype_name], bias=True, dropout_p=0.1, seed=2**61 + 3,
                         device="cuda")


def test_dropout_mask_statistics_on_gpu():
    M, K, p = 8192, 1024, 0.1
    factors = dropout_mask(M, K, p, 42, "cuda")
    kept = (factors != 0).float()
    sigma = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(kept.mean().item() - (1 - p)) < 5 * sigma
    assert torch.equal(factors, dropout_mask(M, K, p, 42, "cuda"))


def test_auto_picks_triton_for_cuda_tensors():
    x = torch.randn(4, 8, device="cuda")
    assert select_backend("auto", x) == "triton"


def test_changing_scale_never_syncs_the_host_or_recompiles():
    _, inputs = make_inputs(512, 256, 768, 8, 3, dtype=torch.bfloat16, device="cuda")
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items() if k != "weight"}
    args = (leaves["x"], inputs["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"], leaves["scale"])
    scaled_lora(*args, dropout_p=0.1, seed=1, backend="triton").sum().backward()  # compile and autotune first
    torch.cuda.synchronize()
    module = kernels()
    jit_kernels = [getattr(module, name).fn for name in ("_scaled_lora_h_kernel", "_scaled_lora_fwd_kernel",
                                                         "_scaled_lora_bwd_t_kernel", "_scaled_lora_bwd_dx_kernel")]
    compiled = [len(k.device_caches[torch.cuda.current_device()][0]) for k in jit_kernels]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            with torch.no_grad():
                leaves["scale"].mul_(0.5).add_(step)
            scaled_lora(*args, dropout_p=0.1, seed=step + 2, backend="triton").sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [len(k.device_caches[torch.cuda.current_device()][0]) for k in jit_kernels] == compiled


@pytest.mark.parametrize("dtype_name", ["f32", "bf16"])
def test_torch_compile_sees_one_op_and_matches_eager(dtype_name):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    base = torch.nn.Linear(768, 2304).to("cuda", dtype)
    layer = metapeft.FusedMetaLoRA(base, rank=16, segments=3, backend="triton").to("cuda", dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 197, 768, device="cuda", dtype=dtype, requires_grad=True)
    eager_y = layer(x)
    eager_grads = torch.autograd.grad(eager_y.float().square().sum(), [x, layer.lora_A, layer.lora_B])
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    grads = torch.autograd.grad(y.float().square().sum(), [x, layer.lora_A, layer.lora_B])
    assert layer.last_backend == "triton"
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y, eager_y, **tol)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, **tol)
