"""CPU benchmark of one meta step on a ViT-S/16-shaped model: metapeft's hypergradient modes against a plain
training step and a naive exact hypergradient (``torch.func`` double differentiation over the unfused reference).

Run: ``python benchmarks/bench_meta_step_cpu.py`` (``--quick``: a tiny ViT, for a smoke run). Model:
timm ``vit_small_patch16_224`` (pretrained=False, 12 blocks, dim 384, 197 tokens), fp32, batch 8 for the
train and the meta batch, LoRA r = 8 on qkv (S = 3: q, k, v), proj, fc1 and fc2 of every block, trainable
head; SGD look-ahead with momentum 0.9 and weight decay 5e-4, as in the paper's recipe.

Contenders (each returns the same kind of thing it would in training):
- ``plain_step``: train forward + backward to the phi gradients (one ordinary PEFT step, optimizer excluded);
- ``first_order`` / ``finite_difference`` / ``exact``: ``metapeft.meta.hypergradient`` in that mode;
- ``naive_exact``: ``torch.func.grad`` of ``L_val(phi - lr * (torch.func.grad(L_train) + wd phi + mu m))``
  through a twin whose LoRA layers are ``metapeft.reference``'s unfused computation (math attention, as the
  double backward needs it).
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
from torch.func import functional_call

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metapeft  # noqa: E402
from benchmarks.harness import cpu_peak_rss_bytes, interleaved_median_times, record_results  # noqa: E402
from metapeft.meta import hypergradient, math_attention, trainable_phi  # noqa: E402
from metapeft.reference import ReferenceMetaLoRA  # noqa: E402

RANK, BATCH, CLASSES, LR, MOMENTUM, WEIGHT_DECAY = 8, 8, 100, 0.01, 0.9, 5e-4
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


def build(shape: dict) -> tuple[nn.Module, tuple, tuple, list[torch.Tensor]]:
    """The metapeft model (nonzero B), a train and a meta batch, and SGD momentum buffers."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=CLASSES, **shape)
    lora_vit(model, lambda linear, segments: metapeft.FusedMetaLoRA(linear, rank=RANK, segments=segments))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, metapeft.FusedMetaLoRA):
                layer.lora_B.normal_(std=0.02)
    metapeft.mark_only_peft_trainable(model, extra=(model.head,))
    size = shape["img_size"]
    train = (torch.randn(BATCH, 3, size, size), torch.randint(0, CLASSES, (BATCH,)))
    val = (torch.randn(BATCH, 3, size, size), torch.randint(0, CLASSES, (BATCH,)))
    buffers = [torch.randn_like(p) * 1e-3 for p in trainable_phi(model)]
    return model.train(), train, val, buffers


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def naive_exact_step(model: nn.Module, train, val, buffers):
    """A closure computing the exact hypergradient by torch.func over the unfused reference twin of ``model``."""
    twin = lora_vit(copy.deepcopy(model), lambda layer, segments: ReferenceMetaLoRA(
        layer.base, layer.rank, layer.alpha, segments))
    phi_ids = {id(p) for p in trainable_phi(model)}
    rho_ids = {id(p) for p in metapeft.meta_parameters(model)}
    named = dict(model.named_parameters())
    phi = {n: p.detach() for n, p in named.items() if id(p) in phi_ids}
    rho = {n: p.detach() for n, p in named.items() if id(p) in rho_ids}
    frozen = {n: p.detach() for n, p in named.items() if id(p) not in phi_ids | rho_ids}
    momentum_terms = {n: MOMENTUM * m for n, m in zip(phi, buffers)}

    def loss(phi_, rho_, batch):
        return F.cross_entropy(functional_call(twin, {**frozen, **phi_, **rho_}, (batch[0],)), batch[1])

    def val_at_lookahead(rho_):
        g = torch.func.grad(loss)(phi, rho_, train)
        lookahead = {n: phi[n] - LR * (g[n] + WEIGHT_DECAY * phi[n] + momentum_terms[n]) for n in phi}
        return loss(lookahead, rho_, val)

    def step():
        with math_attention(twin):
            return torch.func.grad(val_at_lookahead)(rho)

    return step


def contenders(shape: dict) -> dict:
    model, train, val, buffers = build(shape)
    phi = trainable_phi(model)

    def meta(mode):
        return lambda: hypergradient(model, classification_loss, train, val, lr=LR, momentum=MOMENTUM,
                                     momentum_buffers=buffers, weight_decay=WEIGHT_DECAY, mode=mode)

    return {
        "plain_step": lambda: torch.autograd.grad(classification_loss(model, train), phi),
        "first_order": meta("first_order"),
        "finite_difference": meta("finite_difference"),
        "exact": meta("exact"),
        "naive_exact": naive_exact_step(model, train, val, buffers),
    }


def peak_memory_in_subprocess(name: str, quick: bool) -> int:
    """Peak RSS growth of the first call of contender ``name`` in a fresh interpreter."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-of", name] + (["--quick"] if quick else [])
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return int(json.loads(output.strip().splitlines()[-1])["peak_rss_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny ViT (32 px, 2 blocks): a smoke run")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per contender (default 5)")
    parser.add_argument("--memory-of", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    if args.memory_of:
        fn = contenders(shape)[args.memory_of]
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        print(json.dumps({"peak_rss_bytes": cpu_peak_rss_bytes(fn)}))
        return

    memory = {name: peak_memory_in_subprocess(name, args.quick) for name in CONTENDERS}
    times = interleaved_median_times(contenders(shape), warmup=1, reps=args.reps)
    plain, naive = times["plain_step"][0], times["naive_exact"][0]
    rows = []
    for name in CONTENDERS:
        median, iqr = times[name]
        rows.append({
            "contender": name, "median_s": median, "iqr_s": iqr, "peak_rss_MiB": memory[name] / 2**20,
            "time / plain_step": median / plain, "time / naive_exact": median / naive,
            "memory / naive_exact": memory[name] / memory["naive_exact"],
        })
    for row in rows:
        print(row)
    size = f"{shape['img_size']} px, {shape['depth']} blocks"
    record_results(
        "meta_step_cpu" + ("_quick" if args.quick else ""), rows,
        f"One meta step on CPU: ViT-S/16 ({size}), fp32, batch 8 + meta batch 8, LoRA r=8 on qkv/proj/fc1/fc2",
        command="python benchmarks/bench_meta_step_cpu.py" + (" --quick" if args.quick else "")
        + (f" --reps {args.reps}" if args.reps != 5 else ""),
    )


if __name__ == "__main__":
    main()
