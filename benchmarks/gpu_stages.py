"""The GPU check's whole-step stages, each run by ``benchmarks/gpu_check.py`` in a process of its own (a crash, a
hang or a poisoned CUDA context ends that stage only): ``vit_step``, ``meta_step`` and ``adapters``.

Run: ``python benchmarks/gpu_stages.py STAGE --progress FILE [--dry-run]``. After every contender the stage rewrites
FILE (JSON: ``rows`` so far, ``errors`` by contender, ``reached``, ``done``), so a stage killed at its time limit
still leaves what it measured. A contender that raises is recorded with its error and the next one runs; the stage
then exits 1. On a GPU a finished stage also appends its rows to ``benchmarks/results/<stage>_gpu.{json,md}``.

Timing on a GPU: one warm-up call (compilation, autotuning, optimizer state), then ``benchmarks.harness.gpu_bench``:
one call between ``torch.cuda.reset_peak_memory_stats`` and ``torch.cuda.max_memory_allocated`` (``peak_MiB``:
everything allocated, weights included; ``peak_growth_MiB``: above what was allocated before the call), then the
median of ``triton.testing.do_bench``. ``--dry-run``: CPU, tiny shapes, fp32, the Triton interpreter for the triton
contenders (``TRITON_INTERPRET=1``, set by gpu_check); ``ms`` is one call's wall time, not a measurement, and
nothing is recorded.

Stages (GPU; dry run in brackets):
- ``vit_step``: ``benchmarks/bench_vit_step_cpu.py``'s training step (its ``build`` and ``make_step``):
  timm ViT-B/16, 224 px, batch 64 [16 px, 1 block, dim 32, batch 2], LoRA r = 8 on q, k, v, out, mlp1, mlp2,
  SGD with momentum, forward under bf16 autocast [fp32]; contenders ``metapeft`` (backend "auto"), ``hf_peft``,
  ``plain``, then ``metapeft[<backend>]`` for every other fused backend that runs here (the one "auto" ran is not
  repeated). Each contender is built, measured and freed before the next, so its peak is its own. The loss before
  the first step is recorded: metapeft and plain hold the same weights and must agree.
- ``meta_step``: ``benchmarks/bench_meta_step_cpu.py``'s contenders (``plain_step``, ``first_order``,
  ``finite_difference``, ``exact``, ``naive_exact``: torch.func over plain PyTorch LoRA) on ViT-B/16, 224 px,
  batch 32 + meta batch 32 [16 px, 1 block, dim 32, batch 2 + 2], the loss under bf16 autocast [fp32]. All share
  one process and one model (the naive contender's twin is alive throughout): compare ``peak_growth_MiB``.
- ``adapters``: ``FusedMetaAdapter`` on every fused backend that runs here vs ``benchmarks.contenders.
  PlainMetaAdapter`` (same weights), parallel (AdaptFormer) and sequential (Houlsby), x (M, 768) with M = 1576 and
  12608 (batch 8 and 64 of ViT-B's 197 tokens), bottleneck 64, bf16 [M 16, D 32, bottleneck 8, fp32]; fwd and
  fwd+bwd, each contender's output and gradients first checked against ``metapeft.reference.adapter_reference`` in
  fp32 on the same weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metapeft  # noqa: E402
from benchmarks.harness import gpu_bench, record_results, write_atomically  # noqa: E402

STAGES = ("vit_step", "meta_step", "adapters")
VIT_GPU = {"model_name": "vit_base_patch16_224", "model_kwargs": {}, "image": 224, "batch": 64}
TINY = {"img_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}  # dry runs: 2 tokens, interpreter-sized
VIT_DRY = {"model_name": "vit_tiny_patch16_224", "model_kwargs": TINY, "image": 16, "batch": 2}
META_GPU = {"model_name": "vit_base_patch16_224", "shape": {"img_size": 224, "depth": 12}, "batch": 32}
META_DRY = {"model_name": "vit_tiny_patch16_224", "shape": TINY, "batch": 2}
ADAPTER_GPU = {"tokens": (1576, 12608), "dim": 768, "bottleneck": 64}
ADAPTER_DRY = {"tokens": (16,), "dim": 32, "bottleneck": 8}
LOSS_TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # relative; bf16: autocast rounds every GEMM input
ADAPTER_TOLERANCE = {torch.bfloat16: 5e-2, torch.float32: 1e-4}  # as bench_scaled_lora_gpu.py's check


class Progress:
    """What a stage reached, rewritten to ``path`` (atomically) after every step."""

    def __init__(self, path: Path, stage: str, dry_run: bool) -> None:
        self.path, self.dry_run, self.start = path, dry_run, time.perf_counter()
        self.record = {"stage": stage, "dry_run": dry_run, "rows": [], "errors": {}, "reached": "started",
                       "done": False}
        self.save()

    def save(self) -> None:
        write_atomically(self.path, json.dumps(self.record, indent=1) + "\n")

    def row(self, row: dict) -> None:
        self.record["rows"].append(row)
        self.reached(f"{len(self.record['rows'])} rows, last: "
                     + ", ".join(f"{k}={v}" for k, v in row.items() if isinstance(v, str)))

    def reached(self, what: str) -> None:
        self.record["reached"] = what
        self.record["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        print(f"{self.record['stage']} at {self.record['elapsed_s']} s: {what}", flush=True)
        self.save()

    def error(self, contender: str, error: BaseException) -> None:
        self.record["errors"][contender] = f"{type(error).__name__}: {error}"[:2000]
        traceback.print_exc()
        self.reached(f"{contender} failed: {type(error).__name__}")


def measure(fn: Callable[[], object], dry_run: bool, warmup_ms: int = 100, rep_ms: int = 400) -> dict:
    """After one warm-up call, ``benchmarks.harness.gpu_bench``: ``ms`` (median of ``triton.testing.do_bench``) and
    the peak CUDA memory of one call (``peak_growth_MiB`` above what was allocated before it, ``peak_MiB`` in all);
    in a dry run the wall time of a single call only (not a measurement)."""
    if dry_run:
        start = time.perf_counter()
        fn()
        return {"ms": (time.perf_counter() - start) * 1e3}
    fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    median_ms, growth = gpu_bench(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return {"ms": median_ms, "peak_MiB": (before + growth) / 2**20, "peak_growth_MiB": growth / 2**20}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fused_backends(device: torch.device, dtype: torch.dtype, family: str) -> list[str]:
    """The fused backends that can run op ``family`` on ``device`` and ``dtype`` in this process."""
    from metapeft.ops.backends import available_backends, get_backend

    return [name for name in ("torch", "triton", "cuda") if name in available_backends()
            and not get_backend(name).not_supported_reasons(device.type, dtype, family)]


def backends_that_ran(model: torch.nn.Module) -> str:
    """The backends metapeft's layers in ``model`` ran in their last forward ("" when it has none)."""
    return "/".join(sorted({m.last_backend for m in model.modules() if getattr(m, "last_backend", None)}))


def vit_step(progress: Progress, device: torch.device, dry_run: bool) -> None:
    from benchmarks import bench_vit_step_cpu as vit

    setup, amp = (VIT_DRY, None) if dry_run else (VIT_GPU, torch.bfloat16)
    extra = [(f"metapeft[{b}]", b) for b in fused_backends(device, amp or torch.float32, "scaled_lora")]
    losses, ran = {}, {}
    for name, backend in [("metapeft", "auto"), ("hf_peft", "auto"), ("plain", "auto"), *extra]:
        if backend != "auto" and backend == ran.get("metapeft"):
            progress.reached(f"{name} skipped: it is what metapeft's 'auto' ran")
            continue
        try:
            model, optimized = vit.build(name.split("[")[0], setup, device, backend)
            step, loss = vit.make_step(model, optimized, setup, device, amp)
            with torch.no_grad():
                losses[name] = float(loss())
            row = {"contender": name, **measure(step, dry_run), "backends_ran": backends_that_ran(model),
                   "loss_before": losses[name],
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            if name != "hf_peft" and "metapeft" in losses:  # same weights as metapeft: the same loss
                tolerance = LOSS_TOLERANCE[amp or torch.float32] * max(1.0, abs(losses["metapeft"]))
                row["loss_check"] = "ok" if abs(losses[name] - losses["metapeft"]) <= tolerance else "MISMATCH"
            ran[name] = row["backends_ran"]
            progress.row(row)
            del model, optimized, step, loss
        except Exception as error:  # noqa: BLE001 - recorded; the next contender runs
            progress.error(name, error)
        free_memory()


def meta_step(progress: Progress, device: torch.device, dry_run: bool) -> None:
    from benchmarks import bench_meta_step_cpu as meta

    setup = META_DRY if dry_run else META_GPU

    def loss(model, batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not dry_run):
            logits = model(batch[0])
        return F.cross_entropy(logits.float(), batch[1])

    built = meta.build(setup["shape"], device, setup["model_name"], setup["batch"])
    contenders = meta.contenders_of(*built, loss=loss)
    progress.reached("built " + ", ".join(contenders))
    for name, fn in contenders.items():
        try:
            row = {"contender": name, **measure(fn, dry_run)}
            if name != "naive_exact":
                row["backends_ran"] = backends_that_ran(built[0])
            progress.row(row)
        except Exception as error:  # noqa: BLE001 - recorded; the next contender runs
            progress.error(name, error)
        free_memory()


def adapter_error(layer, x: torch.Tensor, residual, grad_y: torch.Tensor, activation: str) -> float:
    """Largest error of y, dx, d down_weight, d up_weight (relative to each tensor's max) against
    ``adapter_reference`` in fp32 on the same weights."""
    from metapeft.reference import adapter_reference

    weights = [layer.down_weight, layer.up_weight]
    x = x.detach().requires_grad_(True)
    y = layer(x) if residual is None else layer(x, residual)
    got = [y, *torch.autograd.grad(y, [x, *weights], grad_y)]
    scale = F.softplus(layer.modulator.detach().float()) * layer.alpha
    x32 = x.detach().float().requires_grad_(True)
    down32, up32 = (w.detach().float().requires_grad_(True) for w in weights)
    y32 = adapter_reference(x32, None if residual is None else residual.float(), down32, layer.down_bias.float(),
                            up32, layer.up_bias.float(), scale, activation)
    want = [y32, *torch.autograd.grad(y32, [x32, down32, up32], grad_y.float())]
    return max(((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-6)).item() for g, w in zip(got, want))


def adapter_calls(layer, x: torch.Tensor, residual, grad_y: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The timed closures: forward (recording autograd) and forward + backward."""
    args = (x,) if residual is None else (x, residual)
    return {"fwd": lambda: layer(*args), "fwd+bwd": lambda: layer(*args).backward(grad_y)}


def adapters(progress: Progress, device: torch.device, dry_run: bool) -> None:
    from benchmarks.contenders import PlainMetaAdapter

    setup, dtype = (ADAPTER_DRY, torch.float32) if dry_run else (ADAPTER_GPU, torch.bfloat16)
    dim, bottleneck = setup["dim"], setup["bottleneck"]
    backends = fused_backends(device, dtype, "adapter")
    for kind in ("parallel", "sequential"):
        for tokens in setup["tokens"]:
            torch.manual_seed(0)
            fused = {b: metapeft.FusedMetaAdapter(dim, bottleneck, kind=kind, backend=b) for b in backends}
            first = next(iter(fused.values()), None)
            with torch.no_grad():
                for layer in fused.values():  # up starts at zero: nonzero, the same in every contender
                    layer.load_state_dict(first.state_dict())
                    layer.up_weight.copy_(torch.linspace(-1, 1, dim * bottleneck).view(dim, bottleneck))
            plain = PlainMetaAdapter(dim, bottleneck, kind=kind)
            if first is not None:
                plain.load_state_dict(first.state_dict())
            layers = {"plain": plain, **{f"fused[{b}]": layer for b, layer in fused.items()}}
            x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
            residual = None if kind == "sequential" else torch.randn(tokens, dim, device=device, dtype=dtype)
            grad_y = torch.randn(tokens, dim, device=device, dtype=dtype)
            case = {"kind": kind, "M": tokens, "D": dim, "bottleneck": bottleneck}
            rows = {mode: dict(case, mode=mode) for mode in ("fwd", "fwd+bwd")}
            for name, layer in layers.items():
                try:
                    layer = layer.to(device, dtype)
                    error = adapter_error(layer, x, residual, grad_y, "relu")
                    if not error <= ADAPTER_TOLERANCE[dtype]:
                        raise AssertionError(f"max relative error {error:.3g} against the fp32 reference")
                    for mode, fn in adapter_calls(layer, x, residual, grad_y).items():
                        result = measure(fn, dry_run, warmup_ms=25, rep_ms=100)
                        rows[mode].update({f"{name}_{k}": v for k, v in result.items()})
                    rows["fwd"][f"{name}_max_rel_err"] = error
                except Exception as error:  # noqa: BLE001 - recorded; the next contender runs
                    progress.error(f"{name} {kind} M={tokens}", error)
            for row in rows.values():
                for name in layers:
                    if name != "plain" and f"{name}_ms" in row and "plain_ms" in row:
                        row[f"plain/{name}"] = row["plain_ms"] / row[f"{name}_ms"]
                progress.row(row)
            free_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--progress", type=Path, required=True, help="JSON file rewritten after every contender")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32; nothing timed or recorded")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_stages.py needs a CUDA device (--dry-run runs on CPU)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    progress = Progress(args.progress, args.stage, args.dry_run)
    {"vit_step": vit_step, "meta_step": meta_step, "adapters": adapters}[args.stage](progress, device, args.dry_run)
    record = progress.record
    if not args.dry_run and record["rows"]:
        record_results(f"{args.stage}_gpu", record["rows"], f"GPU check stage {args.stage} (see benchmarks/"
                       "gpu_stages.py for shapes and contenders)", command=f"python benchmarks/gpu_check.py "
                       f"(stage {args.stage})")
    record["done"] = True
    progress.reached(f"done: {len(record['rows'])} rows, {len(record['errors'])} errors")
    sys.exit(1 if record["errors"] else 0)


if __name__ == "__main__":
    main()
