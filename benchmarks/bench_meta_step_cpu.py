"""CPU benchmark of one meta step on ViT-S/16: metapeft's hypergradient modes vs a plain step and naive torch.func.

The naive exact hypergradient is ``torch.func`` double differentiation over plain PyTorch LoRA.

Run: ``python benchmarks/bench_meta_step_cpu.py --threads 1`` (``--quick``: a tiny ViT, a smoke run, nothing
recorded). Model: timm ``vit_small_patch16_224`` (pretrained=False, 12 blocks, dim 384, 197 tokens), fp32,
batch 8 for the train and the meta batch, LoRA r = 8 on qkv (S = 3: q, k, v), proj, fc1 and fc2 of every
block, trainable head; SGD look-ahead with momentum 0.9 and weight decay 5e-4, as in the paper's recipe.

Contenders (each returns the same kind of thing it would in training):
- ``plain_step``: train forward + backward to the phi gradients (one ordinary PEFT step, optimizer excluded);
- ``first_order`` / ``finite_difference`` / ``exact``: ``metapeft.meta.hypergradient`` in that mode;
- ``naive_exact``: ``metapeft.reference.brute_force_hypergradient`` (the tests' oracle):
  ``torch.func.grad`` of ``L_val(phi - lr * (torch.func.grad(L_train) + wd phi + mu m))`` through a twin whose
  LoRA layers are ``benchmarks.contenders.PlainMetaLoRA`` (the strongest plain-PyTorch formulation; math
  attention, as the double backward needs it).
Times are medians of interleaved rounds (``benchmarks.harness``). Peak memory is the growth of the resident
set during the first call in a fresh subprocess per contender, after ``malloc_trim`` returned the heap freed
while building the model: glibc keeps freed memory mapped, so a warmed-up process would hide the peak.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metapeft  # noqa: E402
from benchmarks.contenders import PlainMetaLoRA  # noqa: E402
from benchmarks.harness import cpu_peak_rss_bytes, interleaved_timings, record_results  # noqa: E402
from metapeft.meta import hypergradient, trainable_phi  # noqa: E402
from metapeft.reference import brute_force_hypergradient  # noqa: E402

RANK, BATCH, CLASSES, LR, MOMENTUM, WEIGHT_DECAY = 8, 8, 100, 0.01, 0.9, 5e-4
MODEL = "vit_small_patch16_224"
FULL = {"img_size": 224, "depth": 12}
QUICK = {"img_size": 32, "depth": 2}
CONTENDERS = ("plain_step", "first_order", "finite_difference", "exact", "naive_exact")


def lora_vit(model: nn.Module, wrap) -> nn.Module:
    """Replace qkv (S = 3), proj, fc1 and fc2 of every block by ``wrap(linear, segments)``."""
    for block in model.blocks:
        block.attn.qkv = wrap(block.attn.qkv, 3)
        block.attn.proj = wrap(block.attn.proj, 1)
        block.mlp.fc1 = wrap(block.mlp.fc1, 1)
        block.mlp.fc2 = wrap(block.mlp.fc2, 1)
    return model


def build(shape: dict, device: str | torch.device = "cpu", model_name: str = MODEL, batch: int = BATCH
          ) -> tuple[nn.Module, tuple, tuple, list[torch.Tensor]]:
    """The metapeft model (nonzero B) on ``device``, a train and a meta batch of ``batch`` images, and SGD momentum
    buffers; ``shape``: timm keywords (``img_size``, ``depth``)."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=CLASSES, **shape)
    lora_vit(model, lambda linear, segments: metapeft.FusedMetaLoRA(linear, rank=RANK, segments=segments))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, metapeft.FusedMetaLoRA):
                layer.lora_B.normal_(std=0.02)
    metapeft.mark_only_peft_trainable(model, extra=(model.head,))
    model = model.to(device)
    size = shape["img_size"]
    train = (torch.randn(batch, 3, size, size), torch.randint(0, CLASSES, (batch,)))
    val = (torch.randn(batch, 3, size, size), torch.randint(0, CLASSES, (batch,)))
    train, val = (tuple(t.to(device) for t in pair) for pair in (train, val))
    buffers = [torch.randn_like(p) * 1e-3 for p in trainable_phi(model)]
    return model.train(), train, val, buffers


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def naive_exact_step(model: nn.Module, train, val, buffers, loss=classification_loss):
    """A closure computing the exact hypergradient by torch.func through a plain-PyTorch twin of ``model``."""
    twin = lora_vit(copy.deepcopy(model), lambda layer, segments: PlainMetaLoRA(
        layer.base, layer.rank, layer.alpha, segments))
    return lambda: brute_force_hypergradient(model, loss, train, val, lr=LR, momentum=MOMENTUM,
                                             momentum_buffers=buffers, weight_decay=WEIGHT_DECAY, twin=twin)


def contenders(shape: dict, device: str | torch.device = "cpu", loss=classification_loss, model_name: str = MODEL,
               batch: int = BATCH) -> dict:
    """name -> closure for every contender of ``CONTENDERS``, sharing one model built by :func:`build`."""
    return contenders_of(*build(shape, device, model_name, batch), loss=loss)


def contenders_of(model: nn.Module, train, val, buffers, loss=classification_loss) -> dict:
    """name -> closure for every contender of ``CONTENDERS`` on what :func:`build` returned; ``loss``:
    ``(model, (x, y)) -> scalar`` (e.g. a forward under bf16 autocast on a GPU)."""
    phi = trainable_phi(model)

    def meta(mode):
        return lambda: hypergradient(model, loss, train, val, lr=LR, momentum=MOMENTUM,
                                     momentum_buffers=buffers, weight_decay=WEIGHT_DECAY, mode=mode)

    return {
        "plain_step": lambda: torch.autograd.grad(loss(model, train), phi),
        "first_order": meta("first_order"),
        "finite_difference": meta("finite_difference"),
        "exact": meta("exact"),
        "naive_exact": naive_exact_step(model, train, val, buffers, loss),
    }


def peak_memory_in_subprocess(name: str, quick: bool, threads: int) -> int:
    """Peak RSS growth of the first call of contender ``name`` in a fresh interpreter."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-of", name, "--threads", str(threads)]
    command += ["--quick"] if quick else []
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return int(json.loads(output.strip().splitlines()[-1])["peak_rss_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny ViT: a smoke run, nothing recorded")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per contender (default 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads (1 gives steadier medians on a shared, oversubscribed machine)")
    parser.add_argument("--memory-of", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    if args.memory_of:
        fn = contenders(shape)[args.memory_of]
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        print(json.dumps({"peak_rss_bytes": cpu_peak_rss_bytes(fn)}))
        return

    memory = {name: peak_memory_in_subprocess(name, args.quick, args.threads) for name in CONTENDERS}
    times = interleaved_timings(contenders(shape), warmup=1, reps=args.reps)
    plain, naive = times["plain_step"], times["naive_exact"]
    rows = []
    for name in CONTENDERS:
        timing = times[name]
        rows.append({
            "contender": name, "cpu_s": timing.cpu_s, "cpu_iqr_s": timing.cpu_iqr_s, "wall_s": timing.wall_s,
            "wall_iqr_s": timing.wall_iqr_s, "peak_rss_MiB": memory[name] / 2**20,
            "cpu / plain_step": timing.cpu_s / plain.cpu_s, "cpu / naive_exact": timing.cpu_s / naive.cpu_s,
            "memory / naive_exact": memory[name] / memory["naive_exact"],
        })
    for row in rows:
        print(row)
    if args.quick:
        return
    size = f"{shape['img_size']} px, {shape['depth']} blocks"
    record_results(
        "meta_step_cpu", rows,
        f"One meta step on CPU: ViT-S/16 ({size}), fp32, batch 8 + meta batch 8, LoRA r=8 on qkv/proj/fc1/fc2",
    )


if __name__ == "__main__":
    main()
