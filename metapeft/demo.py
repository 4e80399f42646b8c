"""``metapeft demo``: a small-scale, end-to-end demonstration of MetaPEFT on a CPU, with no downloads.

What it does (all data is scikit-learn's bundled handwritten digits, see :mod:`metapeft.data.digits`):

1. builds a small timm ``VisionTransformer`` (8x8 grayscale input, 2x2 patches) and pre-trains it by itself on the
   balanced, upright *source* digits (AdamW, cross-entropy); the result is cached (``$METAPEFT_CACHE`` or
   ``~/.cache/metapeft``), so later runs skip this step;
2. fine-tunes two copies on the long-tailed, domain-shifted *target* task (rotated, speckled digits; imbalance 10)
   with the real :func:`metapeft.inject` and :class:`metapeft.MetaPEFTTrainer` (the paper's recipe: SGD with
   momentum 0.9 and weight decay 5e-4, cosine schedule, logit-adjusted loss, cosine classifier; lr 0.05 instead of
   0.01 because the demo trains for only about a hundred steps): LoRA on q, k, v, out, mlp1, mlp2 of every block
   with a fixed scale (plain LoRA), and the same LoRA with learned modulators gamma (LoRA + MetaPEFT, exact
   hypergradient through a one-step look-ahead, meta batches from a re-sampled stratified 20 % of the training set);
3. prints the paper-style table (overall / class-mean / many / medium / few / macro-F1) on the balanced target test
   set and writes ``gamma_heatmap.png``, ``training_curves.png``, ``results.json`` and ``results.md``.

It is a demonstration of the method and the package at toy scale (hundreds of 8x8 images, a 4-block ViT, a few
minutes on 2 CPU cores), not a reproduction of the paper's numbers; differences between the two rows at this scale
are within a few images of the small test set.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from metapeft.metrics import class_split_from_counts, metrics_table

# Target-task groups: many > 30 training images, few < 15 (the target counts are 57 ... 5).
MANY_ABOVE, FEW_BELOW = 30, 15
BANNER = ("metapeft demo: a SMALL-SCALE DEMONSTRATION (8x8 digits, a tiny ViT, CPU), not the paper's benchmark.\n"
          "source task: balanced upright digits; target task: long-tailed (imbalance 10), rotated, speckled digits.")


@dataclass(frozen=True)
class DemoSize:
    """Model and schedule of one demo variant."""

    embed_dim: int
    depth: int
    num_heads: int
    pretrain_epochs: int
    finetune_epochs: int
    batch_size: int
    rank: int
    lr: float
    meta_lr: float


FULL = DemoSize(embed_dim=64, depth=4, num_heads=4, pretrain_epochs=40, finetune_epochs=15, batch_size=32, rank=4,
                lr=0.05, meta_lr=0.05)
QUICK = DemoSize(embed_dim=32, depth=2, num_heads=2, pretrain_epochs=4, finetune_epochs=2, batch_size=32, rank=2,
                 lr=0.05, meta_lr=0.05)
VARIANTS = (("LoRA", False), ("LoRA + MetaPEFT", True))


def default_cache_dir() -> Path:
    """``$METAPEFT_CACHE``, else ``$XDG_CACHE_HOME/metapeft``, else ``~/.cache/metapeft``."""
    if os.environ.get("METAPEFT_CACHE"):
        return Path(os.environ["METAPEFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metapeft"


def build_vit(size: DemoSize, num_classes: int = 10) -> nn.Module:
    """The demo's timm ``VisionTransformer``: (N, 1, 8, 8) images, 2x2 patches (16 tokens + class token)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=num_classes, embed_dim=size.embed_dim,
                             depth=size.depth, num_heads=size.num_heads, mlp_ratio=2.0)


@torch.no_grad()
def accuracy(model: nn.Module, dataset) -> float:
    """Top-1 accuracy of ``model`` on an in-memory dataset (``images``, ``labels`` tensors)."""
    model.eval()
    return float((model(dataset.images).argmax(-1) == dataset.labels).double().mean())


def pretrain(size: DemoSize, source_train, seed: int) -> nn.Module:
    """Full training of :func:`build_vit` on the source task: AdamW (lr 2e-3, wd 0.05), cosine schedule, CE."""
    torch.manual_seed(seed)
    model = build_vit(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(source_train) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, size.pretrain_epochs * steps_per_epoch)
    model.train()
    for _ in tqdm(range(size.pretrain_epochs), desc="pre-training on the source task", leave=False):
        for batch in torch.randperm(len(source_train), generator=generator).split(64):
            loss = F.cross_entropy(model(source_train.images[batch]), source_train.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def cached_backbone(size: DemoSize, tasks, cache_dir: Path, seed: int) -> tuple[nn.Module, str]:
    """The pre-trained source backbone from ``cache_dir`` (keyed by size and seed), pre-training and caching it on
    the first call. Returns ``(model, what happened)``."""
    from safetensors.torch import load_file

    from metapeft.checkpoint import save_safetensors

    key = hashlib.sha256(json.dumps({"size": asdict(size), "seed": seed, "format": 1}).encode()).hexdigest()[:16]
    path = cache_dir / f"demo_digits_vit_{key}.safetensors"
    model = build_vit(size)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), f"loaded the cached source backbone {path}"
    start = time.perf_counter()
    model = pretrain(size, tasks.source_train, seed)
    save_safetensors(model.state_dict(), path)
    return model, f"pre-trained the source backbone in {time.perf_counter() - start:.0f} s, cached at {path}"


def finetune(backbone: nn.Module, size: DemoSize, tasks, meta: bool, run_dir: Path, seed: int, class_split: dict):
    """Inject LoRA (fixed scale or meta-learned gamma) into a copy of ``backbone`` and fit it on the target task
    with :class:`metapeft.MetaPEFTTrainer`, evaluating on the target test set after every epoch.
    Returns ``(trainer, final metrics, seconds)``."""
    from metapeft.inject import inject
    from metapeft.trainer import MetaPEFTTrainer, TrainerConfig

    model = copy.deepcopy(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # both variants start from the same LoRA weights, cached backbone or not
        inject(model, method="lora", rank=size.rank, meta=meta)
    config = TrainerConfig(epochs=size.finetune_epochs, batch_size=size.batch_size, lr=size.lr, meta=meta,
                           meta_lr=size.meta_lr,
                           device="cpu", amp="none", seed=seed, log_every=1, output_dir=str(run_dir),
                           class_split=class_split)
    trainer = MetaPEFTTrainer(model, tasks.target_train, config=config)
    start = time.perf_counter()
    metrics = trainer.fit(eval_set=tasks.target_test)
    return trainer, metrics, time.perf_counter() - start


def read_log(path: Path) -> list[dict]:
    """The trainer's JSONL log as a list of records."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_curves(logs: dict[str, list[dict]], path: Path) -> Path:
    """Training loss per step and target test accuracy (overall, few) per epoch of each run, as one PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.8))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for (name, records), color in zip(logs.items(), ("tab:blue", "tab:red")):
        steps = [r for r in records if r["event"] == "step"]
        loss_axes.plot([r["global_step"] for r in steps], [r["train_loss"] for r in steps], color=color, lw=1,
                       label=name)
        evals = [r for r in records if r["event"] == "eval"]
        epochs = [r["epoch"] for r in evals]
        accuracy_axes.plot(epochs, [100 * r["accuracy"] for r in evals], color=color, marker="o", label=f"{name}: all")
        accuracy_axes.plot(epochs, [100 * (r.get("few_accuracy") or 0) for r in evals], color=color, ls="--",
                           marker="x", label=f"{name}: few")
    loss_axes.set(xlabel="step", ylabel="training loss (logit-adjusted)", title="training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="target test accuracy (%)", title="target test accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("metapeft demo (small scale): LoRA vs LoRA + MetaPEFT on long-tailed, shifted digits")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def run_demo(quick: bool = False, output_dir: str | os.PathLike = "metapeft-demo",
             cache_dir: str | os.PathLike | None = None, threads: int = 1, seed: int = 0) -> dict:
    """Run the demo (module docstring); returns ``{"rows": {method: metrics}, "seconds": {...}, "files": {...}}``.

    quick: a tiny model and schedule (the test suite's smoke run). threads: torch intra-op threads while it runs.
    """
    from metapeft.data.digits import digits_tasks
    from metapeft.gamma import gamma_table, plot_gamma

    size = QUICK if quick else FULL
    output_dir, cache_dir = Path(output_dir), Path(cache_dir) if cache_dir else default_cache_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        print(BANNER)
        tasks = digits_tasks(seed=seed)
        class_split = class_split_from_counts(tasks.target_counts, many=MANY_ABOVE, few=FEW_BELOW)
        print(f"source: {len(tasks.source_train)} training images (balanced); target: {len(tasks.target_train)} "
              f"training images per class {tasks.target_counts}, {len(tasks.target_test)} test images (balanced); "
              f"groups: many > {MANY_ABOVE}, few < {FEW_BELOW} training images")
        backbone, note = cached_backbone(size, tasks, cache_dir, seed)
        print(f"{note}; source test accuracy {100 * accuracy(backbone, tasks.source_test):.1f}%, target test "
              f"accuracy before fine-tuning (source head) {100 * accuracy(backbone, tasks.target_test):.1f}%")
        rows, seconds, logs, trainers = {}, {}, {}, {}
        for name, meta in VARIANTS:
            print(f"fine-tuning: {name}")
            run_dir = output_dir / ("lora_meta" if meta else "lora")
            trainer, metrics, elapsed = finetune(backbone, size, tasks, meta, run_dir, seed, class_split)
            rows[name], seconds[name], trainers[name] = metrics, elapsed, trainer
            logs[name] = read_log(run_dir / "metrics.jsonl")
        meta_model = trainers["LoRA + MetaPEFT"].model
        table = metrics_table(rows)
        files = {"gamma_heatmap": str(plot_gamma(meta_model, output_dir / "gamma_heatmap.png",
                                                 title="demo: learned gamma")),
                 "training_curves": str(plot_curves(logs, output_dir / "training_curves.png"))}
        gammas = gamma_table(meta_model)
        timing = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
        print(f"\nTarget test set ({len(tasks.target_test)} images, balanced), accuracy in %:\n{table}\n")
        print(f"learned gamma (rows: block, columns: position; plain LoRA keeps gamma = 1):\n{gammas}\n")
        print(f"fine-tuning time: {timing}\nwrote {files['gamma_heatmap']} and {files['training_curves']}")
        print("This is a small-scale demonstration on toy data; the paper's settings are in configs/ "
              "(metapeft train --config ...).")
        result = {"rows": rows, "seconds": seconds, "files": files, "size": asdict(size), "seed": seed,
                  "target_counts": tasks.target_counts, "class_split": class_split}
        (output_dir / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        (output_dir / "results.md").write_text(f"{BANNER}\n\n{table}\n\ngamma:\n\n```\n{gammas}\n```\n",
                                               encoding="utf-8")
        return result
    finally:
        torch.set_num_threads(previous_threads)
