"""Ahead-of-time compilation of our Triton kernels for a GPU that is not there (PTX and cubin for sm_80 / sm_90):
catches GPU-only lowering errors (register pressure, dot shapes, dtypes) on a CPU machine."""

from __future__ import annotations

# pointer arguments that hold fp32 whatever the input dtype (scales, partial sums, fp32 outputs)
FP32_POINTERS = ("scale_ptr", "dscale_part_ptr", "part_ptr", "out_ptr", "colsum_part_ptr")
# scalar arguments that are not i32
SCALAR_TYPES = {"p": "fp32", "inv_keep": "fp32"}


def compile_for_gpu(kernel, constexprs: dict, arch: int, dtype: str, num_warps: int | None = None) -> bytes:
    """The cubin of ``kernel`` (a ``triton.jit`` function, or the autotuner wrapping one) for ``sm_{arch}`` with
    tensors of ``dtype`` ("bf16", "fp16", "fp32"; fp32 uses ieee dots, the others tf32), the given constexprs
    (those the kernel does not take are dropped) and ``num_warps`` (default 8 for 128-row tiles, 4 otherwise)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel if isinstance(kernel, triton.runtime.JITFunction) else kernel.fn
    constexprs = {**constexprs, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "seed_ptr":  # the dropout seed: an int64 scalar tensor on the device
            signature[arg] = "*i64"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in FP32_POINTERS else f"*{dtype}"
        else:
            signature[arg] = SCALAR_TYPES.get(arg, "i32")
    if num_warps is None:
        num_warps = 8 if constexprs.get("BLOCK_M") == 128 else 4
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": 3})
    return compiled.asm["cubin"]
