"""Where a tiny-shape call's host time goes: the C++ route's op from a C++ loop, from Python, and as a layer.

The per-call host benchmark (``bench_host_overhead.py``) times whole layer calls from Python. This one splits the C++
route's forward+backward into what the op itself costs and what surrounds it, at the same tiny shapes (x (2, 8, 16),
rank / bottleneck 4, CPU fp32, x requiring grad):
- ``cpp_loop``: the op (``metapeft::scaled_lora`` / ``metapeft::adapter``) called through the dispatcher's typed
  handle in a C++ loop, and ``y.backward(grad_y)`` from C++ (the GIL released, as the autograd engine wants): the
  op's math, its autograd node and the engine (graph task, the op's node, one gradient-accumulation node per leaf),
  without Python;
- ``python_op``: the same op object called from Python (``torch.ops.metapeft...default``; the boxed call from
  Python) and ``y.backward(grad_y)`` from Python;
- ``layer``: ``FusedMetaLoRA`` / ``FusedMetaAdapter`` (what ``bench_host_overhead.py`` times as ``metapeft``);
- ``base``: the frozen ``nn.Linear(16, 16)`` alone, x requiring grad (one leaf, one node);
- for the adapter, ``plain``: ``benchmarks.contenders.PlainMetaAdapter``, the contender of issue 23's target.
Each sample times ``--calls`` calls; contenders are interleaved round by round; per-call medians and interquartile
ranges of process CPU time go to ``benchmarks/results/host_breakdown.{json,md}``.

The C++ loop is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler is needed, and
``metapeft._C`` built); without either the script says why and exits.

Run: ``python benchmarks/bench_host_breakdown.py`` (``--quick``: fewer samples, nothing recorded).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metapeft  # noqa: E402
from benchmarks.contenders import PlainMetaAdapter  # noqa: E402
from benchmarks.harness import interleaved_timings, record_results  # noqa: E402
from metapeft.ops.cpp_autograd import CPP_ROUTE_ERROR  # noqa: E402

BATCH, TOKENS, DIM, RANK = 2, 8, 16, 4

CPP_LOOPS = r"""
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <chrono>

using Optional = std::optional<at::Tensor>;

// Seconds per call of `iters` calls of the op (and, with `backward`, of y.backward(grad_y)), from C++.
template <class Call>
double time_calls(int64_t iters, bool backward, const at::Tensor& grad_y, Call call) {
  pybind11::gil_scoped_release no_gil;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    at::Tensor y = call();
    if (backward) {
      y.backward(grad_y);
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
}

double scaled_lora_loop(const at::Tensor& x, const at::Tensor& weight, const Optional& bias, const at::Tensor& lora_A,
                        const at::Tensor& lora_B, const at::Tensor& modulator, std::string constraint, double factor,
                        const at::Tensor& grad_y, int64_t iters, bool backward) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("metapeft::scaled_lora", "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const Optional&, const at::Tensor&, const at::Tensor&,
                 const at::Tensor&, c10::string_view, double)>();
  return time_calls(iters, backward, grad_y,
                    [&] { return op.call(x, weight, bias, lora_A, lora_B, modulator, constraint, factor); });
}

double adapter_loop(const at::Tensor& x, const Optional& residual, const at::Tensor& down_weight,
                    const Optional& down_bias, const at::Tensor& up_weight, const Optional& up_bias,
                    const at::Tensor& modulator, std::string constraint, double factor, std::string activation,
                    const at::Tensor& grad_y, int64_t iters, bool backward) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("metapeft::adapter", "").typed<
      at::Tensor(const at::Tensor&, const Optional&, const at::Tensor&, const Optional&, const at::Tensor&,
                 const Optional&, const at::Tensor&, c10::string_view, double, c10::string_view)>();
  return time_calls(iters, backward, grad_y, [&] {
    return op.call(x, residual, down_weight, down_bias, up_weight, up_bias, modulator, constraint, factor,
                   activation);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scaled_lora_loop", &scaled_lora_loop);
  m.def("adapter_loop", &adapter_loop);
}
"""


def cpp_loops():
    """The compiled C++ loops (built once per machine under the temporary directory)."""
    from torch.utils.cpp_extension import load_inline

    build = Path(tempfile.gettempdir()) / "metapeft_host_breakdown"
    build.mkdir(exist_ok=True)
    return load_inline("metapeft_host_breakdown", cpp_sources=[CPP_LOOPS], build_directory=str(build),
                       extra_cflags=["-O2"])


def lora_case(loops, count: int) -> dict:
    """Closures running ``count`` fwd / fwd+bwd calls of each LoRA contender, S = 1."""
    torch.manual_seed(0)
    layer = metapeft.FusedMetaLoRA(nn.Linear(DIM, DIM), rank=RANK)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(BATCH, TOKENS, DIM, requires_grad=True)
    grad_y = torch.randn(BATCH, TOKENS, DIM)
    args = (x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.modulator, layer.constraint,
            layer.alpha / layer.rank)
    op = torch.ops.metapeft.scaled_lora.default
    base = nn.Linear(DIM, DIM).requires_grad_(False)
    return contenders(x, grad_y, count, layer=lambda: layer(x), python_op=lambda: op(*args), base=lambda: base(x),
                      cpp_loop=lambda backward: loops.scaled_lora_loop(*args, grad_y, count, backward))


def adapter_case(loops, count: int) -> dict:
    """The same for the parallel adapter, with the plain PyTorch adapter beside it."""
    torch.manual_seed(0)
    layer = metapeft.FusedMetaAdapter(DIM, RANK, kind="parallel")
    with torch.no_grad():
        layer.up_weight.normal_()
    plain = PlainMetaAdapter(DIM, RANK, kind="parallel")
    plain.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(BATCH, TOKENS, DIM, requires_grad=True)
    residual = torch.randn(BATCH, TOKENS, DIM, requires_grad=True)
    grad_y = torch.randn(BATCH, TOKENS, DIM)
    args = (x, residual, layer.down_weight, layer.down_bias, layer.up_weight, layer.up_bias, layer.modulator,
            layer.constraint, layer.alpha, layer.activation)
    op = torch.ops.metapeft.adapter.default
    torch.testing.assert_close(layer(x, residual), plain(x, residual), rtol=1e-5, atol=1e-5)
    return contenders(x, grad_y, count, layer=lambda: layer(x, residual), python_op=lambda: op(*args),
                      plain=lambda: plain(x, residual),
                      cpp_loop=lambda backward: loops.adapter_loop(*args, grad_y, count, backward))


def contenders(x: torch.Tensor, grad_y: torch.Tensor, count: int, cpp_loop, **python_calls) -> dict:
    """{mode: {contender: closure of ``count`` calls}} for fwd and fwd+bwd; ``cpp_loop(backward)`` runs its own."""
    modes = {}
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        closures = {"cpp_loop": lambda backward=backward: cpp_loop(backward)}
        for name, call in python_calls.items():
            def run(call=call, backward=backward) -> None:
                for _ in range(count):
                    y = call()
                    if backward:
                        y.backward(grad_y)
            closures[name] = run
        modes[mode] = closures
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="", help="what this run measures")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed sample (default 200)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved samples per contender (default 15)")
    parser.add_argument("--quick", action="store_true", help="20 calls x 3 samples, nothing recorded")
    args = parser.parse_args()
    if CPP_ROUTE_ERROR is not None:
        sys.exit(f"bench_host_breakdown.py times the C++ route, which is absent here: {CPP_ROUTE_ERROR}")
    if args.quick:
        args.calls, args.reps = 20, 3
    torch.set_num_threads(1)
    loops = cpp_loops()
    rows = []
    for case, build in (("lora S=1", lora_case), ("adapter parallel", adapter_case)):
        for mode, closures in build(loops, args.calls).items():
            row = {"label": args.label, "case": case, "mode": mode}
            for name, timing in interleaved_timings(closures, warmup=1, reps=args.reps).items():
                row[f"{name}_cpu_us"] = timing.cpu_s / args.calls * 1e6
                row[f"{name}_cpu_iqr_us"] = timing.cpu_iqr_s / args.calls * 1e6
            rows.append(row)
            print(f"{case:17s} {mode:8s} " + "  ".join(
                f"{k[:-7]} {v:.1f} us" for k, v in row.items() if k.endswith("_cpu_us")), flush=True)
    if not args.quick:
        title = (f"Where a tiny-shape call's host time goes (x ({BATCH}, {TOKENS}, {DIM}), rank/bottleneck {RANK}, "
                 f"CPU fp32, 1 thread): medians of {args.reps} interleaved samples of {args.calls} calls")
        record_results("host_breakdown", rows, title, all_runs_in_markdown=True)


if __name__ == "__main__":
    main()
