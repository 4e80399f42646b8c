"""Every GPU autotune config of every Triton kernel in ``metapeft/kernels/``, run under the Triton interpreter on CPU
against a float64 oracle (the 2x-error rule).

The interpreter suites in ``tests/ops`` run one interpreter-sized tile per kernel; on a GPU the autotuner may pick
any of the configs in the kernel's GPU list, and the launchers use GPU-sized fixed tiles (the scaled-LoRA
``OUT_TILE``, the dropout-mask tile, the adapter's row blocks). Here a second, non-interpreted import of
``metapeft/kernels/`` reads those GPU lists, and each test swaps one config into every interpreted kernel (pass ``i``
gives each kernel its ``i``-th distinct config, its last one when it has fewer; ``num_warps`` / ``num_stages`` mean
nothing to the interpreter, so configs differing only there count once), with the GPU's fixed tiles. Shapes have a
tail in every tiled dimension (M = 289 also makes the split reductions over M use two slices), ranks and bottlenecks
1/8/16/64 (and a 100-wide bottleneck, whose 128-wide tile takes the adapter's 32-row blocks), S = 1/3, dropout on and
off, fp32.

Slow (241 s on 2 cores shared with other jobs at load average 8):
``python -m pytest -m slow tests/kernels/test_autotune_configs.py`` runs the interpreter-marked tests below in a
``TRITON_INTERPRET=1`` child; directly: ``TRITON_INTERPRET=1 python -m pytest -m interpreter tests/kernels``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metapeft.reference import adapter_reference, scaled_lora_reference
from tests.helpers.oracle import assert_2x_rule, non_contiguous, run_interpreter_suite

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interpreted = pytest.mark.interpreter
KERNELS_DIR = Path(__file__).resolve().parents[2] / "metapeft" / "kernels"
INTERPRETED_PACKAGE = "metapeft_kernels_interpreted"  # a second import of metapeft/kernels/ under its own name
PASSES = 5  # the longest GPU config list (the scaled-LoRA base-GEMM tiles) has 5 distinct configs
ADAPTER_PASSES = 2  # the adapter kernels' GPU configs differ in BLOCK_D (64, 128) only

M, K, N_SEG, D = 289, 75, 67, 75
LORA_CASES = [(r, S, p) for r in (1, 8, 16, 64) for S in (1, 3) for p in (0.0, 0.3)]
ADAPTER_CASES = [(b, kind, act, p) for b in (1, 8, 16, 64, 100) for kind, act in (("parallel", "gelu"),
                                                                                  ("sequential", "relu"))
                 for p in (0.0, 0.3)]


def _import_package(name: str, interpret: bool):
    """``kernels/`` imported as package ``name`` with TRITON_INTERPRET set to ``interpret`` while it loads."""
    if name in sys.modules:
        return sys.modules[name]
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec = importlib.util.spec_from_file_location(name, KERNELS_DIR / "__init__.py",
                                                      submodule_search_locations=[str(KERNELS_DIR)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
        for module in ("scaled_lora", "adapter"):
            importlib.import_module(f"{name}.{module}")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return package


def _autotuned(package) -> dict[str, triton.runtime.autotuner.Autotuner]:
    """Every autotuned kernel of the package, by ``module.kernel`` name."""
    return {f"{module}.{name}": kernel
            for module in ("scaled_lora", "adapter")
            for name, kernel in vars(getattr(package, module)).items()
            if isinstance(kernel, triton.runtime.autotuner.Autotuner)}


def distinct_gpu_configs() -> dict[str, list]:
    """Per autotuned kernel, its GPU configs with distinct tile sizes (from a non-interpreted import)."""
    configs = {}
    for name, kernel in _autotuned(_import_package("kernels_gpu_view", interpret=False)).items():
        unique = {tuple(sorted(c.kwargs.items())): c for c in kernel.configs}
        configs[name] = list(unique.values())
    return configs


@contextlib.contextmanager
def gpu_tiling(package, pass_index: int):
    """Inside the block the interpreted ``package`` runs pass ``pass_index``'s GPU configs and the GPU fixed tiles."""
    gpu_view = _import_package("kernels_gpu_view", interpret=False)
    kernels = _autotuned(package)
    saved = {name: kernel.configs for name, kernel in kernels.items()}
    saved_tiles = (package.scaled_lora.OUT_TILE, package.common.MASK_TILE, package.adapter.INTERPRET)
    try:
        for name, configs in distinct_gpu_configs().items():
            kernels[name].configs = [configs[min(pass_index, len(configs) - 1)]]
        package.scaled_lora.OUT_TILE = gpu_view.scaled_lora.OUT_TILE
        package.common.MASK_TILE = gpu_view.common.MASK_TILE
        package.adapter.INTERPRET = False  # adapter row blocks: the GPU's 64 / 32 rows instead of 128
        yield
    finally:
        for name, kernel in kernels.items():
            kernel.configs = saved[name]
        package.scaled_lora.OUT_TILE, package.common.MASK_TILE, package.adapter.INTERPRET = saved_tiles


def test_every_gpu_config_under_the_interpreter():
    """Run this module's interpreter tests in a TRITON_INTERPRET=1 child (every one must pass)."""
    if INTERPRET:
        pytest.skip("already inside the interpreter run")
    run_interpreter_suite(__file__)


test_every_gpu_config_under_the_interpreter = pytest.mark.slow(test_every_gpu_config_under_the_interpreter)


def test_the_gpu_view_lists_several_configs_per_kernel():
    counts = {name: len(c) for name, c in distinct_gpu_configs().items()}
    assert len(counts) == 8 and all(n >= 2 for n in counts.values()), counts
    assert max(n for name, n in counts.items() if name.startswith("scaled_lora.")) == PASSES, counts
    assert max(n for name, n in counts.items() if name.startswith("adapter.")) == ADAPTER_PASSES, counts


def _grads(fn, leaves: dict, grad_out):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items() if v is not None}
    out = fn(**leaves)
    return out.detach(), dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out)))


def _check(name, fast_out, fast_grads, baseline_fn, inputs, grad_out, baseline_grads=None):
    """2x rule for the output and every gradient the kernels compute (a parallel adapter's d residual is grad_out
    itself, passed through by the op's autograd): fast vs the fp32 baseline (autograd through ``baseline_fn``,
    entries of ``baseline_grads`` replacing its gradients), both against float64 autograd through ``baseline_fn``."""
    base_out, base_grads = _grads(baseline_fn, inputs, grad_out)
    base_grads.update(baseline_grads or {})
    ref_out, ref_grads = _grads(baseline_fn, {k: None if v is None else v.double() for k, v in inputs.items()},
                                grad_out.double())
    assert_2x_rule(f"{name} out", fast_out, base_out, ref_out)
    for key, fast in fast_grads.items():
        assert_2x_rule(f"{name} d{key}", fast, base_grads[key], ref_grads[key])


@interpreted
@pytest.mark.parametrize("pass_index", range(PASSES), ids=lambda i: f"pass{i}")
@pytest.mark.parametrize(("rank", "segments", "dropout_p"), LORA_CASES, ids=lambda v: str(v))
def test_scaled_lora_kernels(pass_index, rank, segments, dropout_p):
    package = _import_package(INTERPRETED_PACKAGE, interpret=True)
    ops = package.scaled_lora
    g = torch.Generator().manual_seed(rank * 10 + segments)
    N = N_SEG * segments
    inputs = {"x": torch.randn(M, K, generator=g), "weight": torch.randn(N, K, generator=g) / K**0.5,
              "bias": torch.randn(N, generator=g), "lora_A": torch.randn(segments * rank, K, generator=g) / K**0.5,
              "lora_B": torch.randn(N, rank, generator=g) / rank**0.5,
              "scale": torch.rand(segments, generator=g) + 0.5}
    grad_y = torch.randn(M, N, generator=g)
    seed = 2**40 + 17
    with gpu_tiling(package, pass_index):
        factors = package.common.dropout_mask(M, K, dropout_p, seed, torch.device("cpu")) if dropout_p else None
        x = non_contiguous(inputs["x"])
        y, h = ops.scaled_lora_fwd(x, inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"],
                                   inputs["scale"], dropout_p, seed)
        grads = ops.scaled_lora_bwd(non_contiguous(grad_y), x, inputs["weight"], inputs["lora_A"], inputs["lora_B"],
                                    inputs["scale"], h, dropout_p, seed, (True,) * 6)
    fast_grads = dict(zip(("x", "weight", "bias", "lora_A", "lora_B", "scale"), grads))

    def baseline(x, weight, bias, lora_A, lora_B, scale):
        dropped = x if factors is None else x * factors.to(x.dtype)
        return F.linear(x, weight, bias) + scaled_lora_reference(dropped, torch.zeros_like(weight), None, lora_A,
                                                                 lora_B, scale)

    # d scale_j = sum(T_j * h_j) (T_j = dY_j B_j) is how the design computes it (M*r work, not M*N), and that sum
    # cancels: at r = 8, S = 1 sum|T h| = 4395 for d scale = -29.6, and its fp32 error is 2.0e-5 where autograd's
    # sum(dY * h B^T) errs by 1.2e-6. Its baseline is that formula in fp32, written plainly.
    x_dropped = inputs["x"] if factors is None else inputs["x"] * factors
    h_plain = (x_dropped @ inputs["lora_A"].t()).unflatten(1, (segments, rank))
    t_plain = torch.einsum("msn,snr->msr", grad_y.unflatten(1, (segments, N_SEG)),
                           inputs["lora_B"].unflatten(0, (segments, N_SEG)))
    _check("scaled_lora", y, fast_grads, baseline, inputs, grad_y,
           baseline_grads={"scale": (t_plain * h_plain).sum(dim=(0, 2))})


@interpreted
@pytest.mark.parametrize("pass_index", range(ADAPTER_PASSES), ids=lambda i: f"pass{i}")
@pytest.mark.parametrize(("bottleneck", "kind", "activation", "dropout_p"), ADAPTER_CASES, ids=lambda v: str(v))
def test_adapter_kernels(pass_index, bottleneck, kind, activation, dropout_p):
    package = _import_package(INTERPRETED_PACKAGE, interpret=True)
    ops = package.adapter
    g = torch.Generator().manual_seed(bottleneck)
    inputs = {"x": torch.randn(M, D, generator=g),
              "residual": torch.randn(M, D, generator=g) if kind == "parallel" else None,
              "down_weight": torch.randn(bottleneck, D, generator=g) / D**0.5,
              "down_bias": torch.randn(bottleneck, generator=g) * 0.5,
              "up_weight": torch.randn(D, bottleneck, generator=g) / bottleneck**0.5,
              "up_bias": torch.randn(D, generator=g), "scale": torch.rand(1, generator=g) + 0.5}
    grad_out = torch.randn(M, D, generator=g)
    seed = 2**40 + 17
    weights = [inputs[k] for k in ("down_weight", "down_bias", "up_weight", "up_bias")]
    with gpu_tiling(package, pass_index):
        factors = package.common.dropout_mask(M, D, dropout_p, seed, torch.device("cpu")) if dropout_p else None
        x = non_contiguous(inputs["x"])
        out, z = ops.adapter_fwd(x, inputs["residual"], *weights, inputs["scale"], activation, dropout_p, seed)
        grads = ops.adapter_bwd(non_contiguous(grad_out), x, inputs["down_weight"], inputs["up_weight"],
                                inputs["up_bias"], inputs["scale"], z, activation, dropout_p, seed,
                                residual_is_x=kind == "sequential", needs=(True,) * 6)
    fast_grads = dict(zip(("x", "down_weight", "down_bias", "up_weight", "up_bias", "scale"), grads))

    def baseline(x, down_weight, down_bias, up_weight, up_bias, scale, residual=None):
        dropped = x if factors is None else x * factors.to(x.dtype)
        return adapter_reference(dropped, x if residual is None else residual, down_weight, down_bias, up_weight,
                                 up_bias, scale, activation)

    _check("adapter", out, fast_grads, baseline, inputs, grad_out)
