"""Per-call host overhead at tiny shapes: FusedMetaLoRA / FusedMetaAdapter vs HF PEFT and plain PyTorch, CPU.

At tiny shapes the arithmetic is negligible and a call costs what Python and the dispatcher cost: the regime
in which a GPU waits on the host (ViT-B with LoRA on six positions makes 48 such calls per forward).

Cases (CPU tensors, fp32, training mode, parameters requiring grad, x requiring grad as inside a network):
- ``lora S=1``: x (2, 8, 16) through ``nn.Linear(16, 16)`` with rank 4. Contenders: ``metapeft``
  (``FusedMetaLoRA``, learnable modulator), ``hf_peft`` (PEFT's ``lora.Linear``, fixed scale: no modulator
  to differentiate), ``plain`` (``benchmarks.contenders.PlainMetaLoRA``, learnable modulator, autograd backward),
  ``base`` (the frozen ``nn.Linear`` alone: the floor of any LoRA layer, one autograd node and x's gradient).
- ``lora S=3``: the same into ``nn.Linear(16, 48)`` (a fused qkv) with one LoRA and gamma per segment;
  ``hf_peft`` there is one rank-4 LoRA over all 48 outputs (PEFT cannot split a fused qkv: less work).
- ``adapter parallel`` / ``adapter sequential``: ``FusedMetaAdapter(16, 4)`` (AdaptFormer, with a residual /
  Houlsby) vs ``benchmarks.contenders.PlainMetaAdapter``.
- ``lora S=1, 8 chained`` / ``adapter sequential, 8 chained``: eight such layers in an ``nn.Sequential`` (each
  contender's own eight), x into the first: as inside a network, only the first input is a leaf and one backward
  serves all eight; times per layer (a chain call's over 8). A single call pays the backward call's fixed cost and
  x's gradient accumulation once per layer; a network pays them once per step.
Where ``metapeft._C`` is built, ``metapeft`` takes the C++ route (one dispatcher call, a C++ backward); every case
also times the same metapeft layer on the Python routes (``metapeft.ops.cpp_autograd.python_routes()``):
``metapeft_python`` (autograd through the ATen composite, what runs without ``_C``) and ``metapeft_function``
(also inside ``metapeft.ops.double_backward_ahead()``: the op's ``autograd.Function``, the route the triton and cuda
kernels take on a GPU, here with the torch launchers: the host cost of that route without a kernel launch).
Modes: ``fwd`` (autograd recording) and ``fwd+bwd`` (``y.backward(grad_y)``). A sample times ``--calls`` calls;
samples of all contenders of a case are interleaved round by round; per-call medians and interquartile ranges
of process CPU time (one thread: the host work itself, steadier than wall time on a shared machine) and of wall
time are recorded with ``--label`` (e.g. ``before`` / ``after`` a change) in
``benchmarks/results/host_overhead.{json,md}`` (the markdown shows every recorded run).

``--device cuda``: the same on CUDA tensors (the regime the CPU numbers stand for: a GPU waiting on the host); CPU
time is then the host's work per call, wall time includes the GPU's (one synchronize per sample). ``metapeft``
takes "auto" (the shipped GPU default's kernels, through the op's ``autograd.Function``), the added
``metapeft_torch`` the torch backend (the C++ route). Results go to ``benchmarks/results/host_overhead_gpu.{json,md}``;
``benchmarks/gpu_check.py`` runs it as its ``host_overhead`` stage.

Run: ``python benchmarks/bench_host_overhead.py --label after`` (``--quick``: fewer samples, nothing recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metapeft  # noqa: E402
from benchmarks.contenders import PlainMetaAdapter, PlainMetaLoRA, hf_peft_lora_linear  # noqa: E402
from benchmarks.harness import interleaved_timings, record_results  # noqa: E402
from metapeft.layers.base import MetaPEFTModule  # noqa: E402
from metapeft.ops.cpp_autograd import python_routes  # noqa: E402

BATCH, TOKENS, DIM, RANK = 2, 8, 16, 4
CHAIN = 8  # layers in the chained cases
MODES = ("fwd", "fwd+bwd")
FUNCTION_ROUTE = "metapeft_function"
PYTHON_ROUTE = "metapeft_python"
TORCH_BACKEND = "metapeft_torch"  # CUDA only


@contextlib.contextmanager
def function_route():
    """The op's autograd.Function route: the Python routes, inside double_backward_ahead()."""
    with python_routes(), metapeft.ops.double_backward_ahead():
        yield


def lora_contenders(segments: int, seed: int = 0) -> dict[str, nn.Module]:
    """The three LoRA contenders around identical frozen ``nn.Linear(16, 16 * segments)`` layers, nonzero B (the
    plain one holds metapeft's weights: their outputs are checked equal), and ``base``, the frozen Linear alone."""
    torch.manual_seed(seed)
    fused = metapeft.FusedMetaLoRA(nn.Linear(DIM, DIM * segments), rank=RANK, segments=segments)
    with torch.no_grad():
        fused.lora_B.normal_()
    plain = PlainMetaLoRA(nn.Linear(DIM, DIM * segments), rank=RANK, segments=segments)
    plain.load_state_dict(fused.state_dict())
    torch.manual_seed(seed)
    return {"metapeft": fused, PYTHON_ROUTE: fused, FUNCTION_ROUTE: fused,
            "hf_peft": hf_peft_lora_linear(nn.Linear(DIM, DIM * segments), RANK), "plain": plain,
            "base": nn.Linear(DIM, DIM * segments).requires_grad_(False)}


def adapter_contenders(kind: str, seed: int = 0) -> dict[str, nn.Module]:
    """``FusedMetaAdapter(16, 4, kind=kind)`` and its plain-PyTorch twin with the same weights, nonzero up."""
    torch.manual_seed(seed)
    fused = metapeft.FusedMetaAdapter(DIM, RANK, kind=kind)
    with torch.no_grad():
        fused.up_weight.normal_()
    plain = PlainMetaAdapter(DIM, RANK, kind=kind)
    plain.load_state_dict(fused.state_dict(), strict=False)
    return {"metapeft": fused, PYTHON_ROUTE: fused, FUNCTION_ROUTE: fused, "plain": plain}


def with_torch_backend(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose metapeft layers ask for the torch backend (on CUDA: the C++ route, where "auto"
    takes the shipped GPU default's kernels)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, MetaPEFTModule):
            module.backend = "torch"
    return model


def chained(contenders, depth: int) -> dict[str, nn.Module]:
    """Each contender ``depth`` times in an ``nn.Sequential`` (layers built from seeds 0..depth-1): as inside a
    network, only the first layer's input is a leaf, and one backward serves every layer."""
    layers = [contenders(seed=seed) for seed in range(depth)]
    return {name: nn.Sequential(*(built[name] for built in layers)) for name in layers[0]}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a sample's wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calls(layer: nn.Module, inputs: tuple[torch.Tensor, ...], grad_y: torch.Tensor, count: int, route) -> dict:
    """Closures running ``count`` calls of each mode inside the context ``route()``."""

    def forward() -> None:
        with route():
            for _ in range(count):
                layer(*inputs)
        synchronize(grad_y.device)

    def forward_backward() -> None:
        with route():
            for _ in range(count):
                layer(*inputs).backward(grad_y)
        synchronize(grad_y.device)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def measure(case: str, layers: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...], args, depth: int = 1
            ) -> list[dict]:
    """One row per mode: per-call CPU and wall medians (us) and IQRs of every contender, and the ratios; for a chain
    of ``depth`` layers, per layer (a chain call's time over ``depth``)."""
    with torch.no_grad():
        outputs = {name: layer(*inputs) for name, layer in layers.items()}
    grad_y = torch.randn_like(outputs["metapeft"])
    routes = {FUNCTION_ROUTE: function_route, PYTHON_ROUTE: python_routes}
    torch.testing.assert_close(outputs["metapeft"], outputs["plain"], rtol=1e-5, atol=1e-5)
    rows = []
    for mode in MODES:
        closures = {name: calls(layer, inputs, grad_y, args.calls, routes.get(name, contextlib.nullcontext))[mode]
                    for name, layer in layers.items()}
        row = {"label": args.label, "case": case, "mode": mode}
        per_call = 1e6 / (args.calls * depth)
        for name, timing in interleaved_timings(closures, warmup=1, reps=args.reps).items():
            row[f"{name}_cpu_us"] = timing.cpu_s * per_call
            row[f"{name}_cpu_iqr_us"] = timing.cpu_iqr_s * per_call
            row[f"{name}_wall_us"] = timing.wall_s * per_call
            row[f"{name}_wall_iqr_us"] = timing.wall_iqr_s * per_call
        for name in layers:
            if name != "metapeft":
                row[f"metapeft/{name}"] = row["metapeft_cpu_us"] / row[f"{name}_cpu_us"]
        rows.append(row)
        print(f"{case:18s} {mode:8s} " + "  ".join(
            f"{name} {row[f'{name}_cpu_us']:.0f} us" for name in layers) + "  " + "  ".join(
            f"{k} {v:.2f}x" for k, v in row.items() if "/" in k), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="", help="what this run measures, e.g. 'before' or 'after'")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed sample (default 200)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved samples per contender (default 15)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the tensors live (default cpu)")
    parser.add_argument("--quick", action="store_true", help="20 calls x 3 samples, nothing recorded")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.reps = 20, 3
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA device; none is available here")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    x = torch.randn(BATCH, TOKENS, DIM, device=device, requires_grad=True)
    residual = torch.randn(BATCH, TOKENS, DIM, device=device, requires_grad=True)
    cases = [(f"lora S={segments}", lora_contenders(segments), (x,), 1) for segments in (1, 3)]
    cases += [("adapter parallel", adapter_contenders("parallel"), (x, residual), 1),
              ("adapter sequential", adapter_contenders("sequential"), (x,), 1),
              (f"lora S=1, {CHAIN} chained, per layer", chained(lambda seed: lora_contenders(1, seed), CHAIN), (x,),
               CHAIN),
              (f"adapter sequential, {CHAIN} chained, per layer",
               chained(lambda seed: adapter_contenders("sequential", seed), CHAIN), (x,), CHAIN)]
    rows = []
    for case, layers, inputs, depth in cases:
        layers = {name: layer.to(device) for name, layer in layers.items()}
        if device.type == "cuda":
            layers[TORCH_BACKEND] = with_torch_backend(layers["metapeft"])
        rows += measure(case, layers, inputs, args, depth)
    if not args.quick:
        title = (f"Per-call host time at tiny shapes (x ({BATCH}, {TOKENS}, {DIM}), rank/bottleneck {RANK}, "
                 f"{args.device.upper()} tensors, fp32, {args.threads} thread): medians of {args.reps} interleaved "
                 f"samples of {args.calls} calls")
        record_results("host_overhead" if args.device == "cpu" else "host_overhead_gpu", rows, title,
                       all_runs_in_markdown=True)


if __name__ == "__main__":
    main()
