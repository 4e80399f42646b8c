"""CPU benchmark: one ViT-B/16 training step (batch 8, LoRA r=8 on q, k, v, out, mlp1, mlp2 of all 12 blocks, fp32).

Contenders, all on the same frozen timm ``vit_base_patch16_224`` (``pretrained=False``; 15 classes, trainable head):
- ``metapeft``: ``metapeft.inject(model, rank=8)``: ``FusedMetaLoRA`` with learnable modulators (fused op).
- ``hf_peft``: HF PEFT ``LoraConfig(r=8, lora_alpha=8)`` on ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``
  (fixed scale; PEFT cannot split the fused qkv, so its qkv LoRA has rank 8 in all where metapeft gives each of q,
  k, v its own rank-8 LoRA: 3x the qkv LoRA work).
- ``plain``: the same placement with ``benchmarks.contenders.PlainMetaLoRA``: learnable modulators in the
  strongest plain-PyTorch formulation (scale on B; a scaled block-diagonal B for qkv), autograd backward.

A step is ``zero_grad -> cross_entropy(model(x)) -> backward -> SGD(lr 0.01, momentum 0.9, wd 5e-4).step()`` over
the PEFT weights and the head. Step times are interleaved medians (``benchmarks.harness``) of wall time and of
process CPU time (the steadier measure on a shared machine; with ``--threads 1`` it is the step's work). Peak
memory is the resident-set growth of one warm step, each contender in a fresh process with glibc's mmap threshold
pinned low so freed activations leave the resident set at once; ``saved_MiB`` is what autograd keeps for backward
besides the weights.

``--compile``: every contender's model under ``torch.compile`` (inductor, CPU) on a ViT-S/16 (224 px, 12 blocks,
batch 8; compile time and graph breaks from ``torch._dynamo.explain`` recorded, no peak memory: a fresh process
per contender would compile again), recorded as ``vit_step_compiled_cpu``.

Run: ``python benchmarks/bench_vit_step_cpu.py --threads 1`` (``--compile`` for the compiled step; ``--quick``: a
tiny ViT, a smoke run, nothing recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metapeft  # noqa: E402
from benchmarks.contenders import PlainMetaLoRA  # noqa: E402
from benchmarks.harness import cpu_peak_rss_bytes, interleaved_timings, record_results  # noqa: E402
from metapeft.inject import peft_modules, replace_module  # noqa: E402

CONTENDERS = ("metapeft", "hf_peft", "plain")
RANK, BATCH, CLASSES = 8, 8, 15
FULL = {"model_name": "vit_base_patch16_224", "model_kwargs": {}, "image": 224, "warmup": 2, "reps": 7}
QUICK = {"model_name": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 64, "depth": 2}, "image": 64,
         "warmup": 1, "reps": 3}
COMPILED = {"model_name": "vit_small_patch16_224", "model_kwargs": {}, "image": 224, "warmup": 1, "reps": 5}
HF_TARGETS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


def build(contender: str, setup: dict, device: str | torch.device = "cpu", backend: str = "auto"
          ) -> tuple[nn.Module, list[nn.Parameter]]:
    """The contender's model on ``device`` (seeded: identical base and LoRA weights across contenders) and the
    parameters its optimizer updates (PEFT weights and head; modulators get gradients but belong to the outer
    loop). ``backend``: metapeft's kernel backend (``metapeft.inject``'s ``backend``; other contenders ignore it)."""
    torch.manual_seed(0)
    model = timm.create_model(setup["model_name"], pretrained=False, num_classes=CLASSES, **setup["model_kwargs"])
    if contender == "hf_peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=HF_TARGETS,
                                                 modules_to_save=["head"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        model = model.to(device)
        return model.train(), [p for p in model.parameters() if p.requires_grad]
    metapeft.inject(model, rank=RANK, backend=backend)
    with torch.no_grad():
        for _, module in peft_modules(model):
            module.lora_B.normal_(0, 0.02)
    if contender == "plain":
        for name, module in peft_modules(model):
            plain = PlainMetaLoRA(module.base, rank=RANK, alpha=module.alpha, segments=module.segments)
            plain.load_state_dict(module.state_dict())
            replace_module(model, name, plain)
        model = model.to(device)
        optimized = [p for name, p in model.named_parameters() if "lora_" in name] + list(model.head.parameters())
    else:
        model = model.to(device)
        optimized = metapeft.peft_parameters(model) + list(model.get_classifier().parameters())
    return model.train(), optimized


def make_step(model: nn.Module, optimized: list[nn.Parameter], setup: dict, device: str | torch.device = "cpu",
              amp_dtype: torch.dtype | None = None):
    """One training step on a fixed batch (``setup["batch"]``, default ``BATCH``) on ``device``, the forward under
    autocast to ``amp_dtype`` when one is given (logits cast to float32 for the loss, as the trainer does):
    (step(), loss_of_forward())."""
    generator = torch.Generator().manual_seed(1)
    batch = setup.get("batch", BATCH)
    x = torch.randn(batch, 3, setup["image"], setup["image"], generator=generator).to(device)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator).to(device)
    optimizer = torch.optim.SGD(optimized, lr=0.01, momentum=0.9, weight_decay=5e-4)
    device_type = torch.device(device).type

    def loss() -> torch.Tensor:
        autocast = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            logits = model(x)
        return F.cross_entropy(logits.float(), labels)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step, loss


def saved_activation_bytes(fn, model: nn.Module) -> int:
    """Bytes autograd saves for backward in ``fn()``, leaving out the model's own parameters and buffers (which
    ``benchmarks.harness.saved_tensor_bytes`` counts: they are alive anyway and would swamp the activations)."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def peak_memory_in_subprocess(contender: str, quick: bool, threads: int) -> int:
    """Peak RSS growth of one warm step of ``contender``, measured in a fresh interpreter."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    command = [sys.executable, __file__, "--memory-of", contender, "--threads", str(threads)]
    command += ["--quick"] if quick else []
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def compiled_step(setup: dict, quick: bool) -> None:
    """Time the training step of every contender's ``torch.compile``-d model (interleaved), with the first
    step's time (compilation included) and the graph breaks dynamo reports; record ``vit_step_compiled_cpu``."""
    import time

    models, steps, compile_s, breaks = {}, {}, {}, {}
    for name in CONTENDERS:
        model, optimized = build(name, setup)
        x = torch.randn(BATCH, 3, setup["image"], setup["image"])
        breaks[name] = torch._dynamo.explain(model)(x).graph_break_count
        torch._dynamo.reset()
        models[name] = torch.compile(model, backend="inductor")
        steps[name], _ = make_step(models[name], optimized, setup)
        start = time.perf_counter()
        steps[name]()
        compile_s[name] = time.perf_counter() - start
        print(f"{name}: {breaks[name]} graph breaks, first step (compiling) {compile_s[name]:.0f} s", flush=True)
    times = interleaved_timings(steps, warmup=setup["warmup"], reps=setup["reps"])
    rows = [{"contender": name, "cpu_step_ms": t.cpu_s * 1e3, "cpu_iqr_ms": t.cpu_iqr_s * 1e3,
             "cpu_vs_metapeft": t.cpu_s / times["metapeft"].cpu_s, "wall_step_ms": t.wall_s * 1e3,
             "wall_iqr_ms": t.wall_iqr_s * 1e3, "graph_breaks": breaks[name], "first_step_s": compile_s[name]}
            for name, t in times.items()]
    for row in rows:
        print(json.dumps(row))
    if not quick:
        record_results("vit_step_compiled_cpu", rows,
                       f"Compiled (torch.compile, inductor) {setup['model_name']} training step on CPU: batch {BATCH}, "
                       f"LoRA r={RANK} on q,k,v,out,mlp1,mlp2 of all blocks, fp32, {setup['reps']} interleaved reps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny ViT smoke run; nothing recorded")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads (1 gives steadier medians on a shared, oversubscribed machine)")
    parser.add_argument("--compile", action="store_true", help="torch.compile (inductor) every contender's model")
    parser.add_argument("--memory-of", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else COMPILED if args.compile else FULL
    if args.compile:
        compiled_step(setup, args.quick)
        return
    if args.memory_of:
        step, _ = make_step(*build(args.memory_of, setup), setup)
        step()
        print(json.dumps({"peak_rss_bytes": cpu_peak_rss_bytes(step)}))
        return
    models = {name: build(name, setup) for name in CONTENDERS}
    steps, losses = {}, {}
    for name, (model, optimized) in models.items():
        steps[name], losses[name] = make_step(model, optimized, setup)
    with torch.no_grad():
        first = {name: float(loss()) for name, loss in losses.items()}
    print("loss before the first step:", first)
    if abs(first["metapeft"] - first["plain"]) > 1e-4 * max(1.0, abs(first["plain"])):
        raise AssertionError("metapeft and the plain-PyTorch contender disagree on identical weights")
    saved = {name: saved_activation_bytes(loss, models[name][0]) for name, loss in losses.items()}
    times = interleaved_timings(steps, warmup=setup["warmup"], reps=setup["reps"])
    peaks = {name: peak_memory_in_subprocess(name, args.quick, args.threads) for name in CONTENDERS}
    rows = []
    for name in CONTENDERS:
        model, optimized = models[name]
        timing = times[name]
        rows.append({
            "contender": name,
            "cpu_step_ms": timing.cpu_s * 1e3,
            "cpu_iqr_ms": timing.cpu_iqr_s * 1e3,
            "cpu_vs_metapeft": timing.cpu_s / times["metapeft"].cpu_s,
            "wall_step_ms": timing.wall_s * 1e3,
            "wall_iqr_ms": timing.wall_iqr_s * 1e3,
            "wall_vs_metapeft": timing.wall_s / times["metapeft"].wall_s,
            "peak_rss_MiB": peaks[name] / 2**20,
            "saved_MiB": saved[name] / 2**20,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        })
    for row in rows:
        print(json.dumps(row))
    if not args.quick:
        record_results("vit_step_cpu", rows,
                       f"ViT-B/16 training step on CPU: batch {BATCH}, LoRA r={RANK} on q,k,v,out,mlp1,mlp2 of "
                       f"all blocks, fp32, {setup['reps']} interleaved reps")


if __name__ == "__main__":
    main()
