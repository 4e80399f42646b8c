"""``metapeft demo``: a small-scale, end-to-end demonstration of MetaPEFT on a CPU, with no downloads.

What it does (all data is scikit-learn's bundled handwritten digits, see :mod:`metapeft.data.digits`):

1. builds a small timm ``VisionTransformer`` (8x8 grayscale input, 2x2 patches) and pre-trains it by itself on the
   balanced, upright *source* digits (AdamW, cross-entropy); the result is cached (``$METAPEFT_CACHE`` or
   ``~/.cache/metapeft``), so later runs skip this step;
2. fine-tunes copies on the long-tailed, domain-shifted *target* task (rotated, speckled digits; imbalance 10) with
   the real :func:`metapeft.inject` and :class:`metapeft.MetaPEFTTrainer` (the paper's recipe: SGD with momentum 0.9
   and weight decay 5e-4, cosine schedule, logit-adjusted loss, cosine classifier; lr 0.05 instead of 0.01 because
   the demo trains for only about a hundred steps): LoRA on q, k, v, out, mlp1, mlp2 of every block with a fixed
   scale (plain LoRA), the same LoRA with learned modulators gamma (LoRA + MetaPEFT, the trainer's default meta
   schedule) and with one learned gamma per output channel instead of per module (``gamma="channel"``, the
   authors' code's modulator vector), once per seed. The seeds vary the LoRA initialisation, the batch order and
   the meta batches; the data split and the pre-trained backbone stay fixed, so each seed gives a paired comparison;
3. prints mean +- std over the seeds of the paper-style metrics (overall / class-mean / many / medium / few /
   macro-F1) on the balanced target test set, the paired differences (each MetaPEFT variant - LoRA) with their 95 %
   t-intervals, and
   writes ``gamma_heatmap.png`` (the learned gamma averaged over seeds), ``training_curves.png``, ``results.json``
   and ``results.md``; ``readme`` rewrites a README's demo table from those results.

It is a demonstration of the method and the package at toy scale (hundreds of 8x8 images, a 4-block ViT, a few
minutes on 2 CPU cores), not a reproduction of the paper's numbers.
"""

from __future__ import annotations

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

from metapeft.gamma import GammaTable, plot_gamma
from metapeft.metrics import class_split_from_counts
from metapeft.report import replace_section, write_json, write_text
from metapeft.stats import format_difference, format_summary, paired_difference, summarize
from metapeft.sweep import META, PLAIN, Cell, fit_and_evaluate, metric_columns, run_grid, with_seeds

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
VARIANTS = (Cell("lora", {"method": "LoRA"}, peft=PLAIN, train=PLAIN),
            Cell("lora_meta", {"method": "LoRA + MetaPEFT"}, peft=META, train=META),
            Cell("lora_meta_channel", {"method": "LoRA + MetaPEFT, per-channel gamma"},
                 peft={**META, "gamma": "channel"}, train=META))
BASELINE, METHOD, CHANNEL = (cell.point["method"] for cell in VARIANTS)
# The table's difference row of each MetaPEFT variant (paired with LoRA per seed).
DIFFERENCE_ROWS = {METHOD: "difference (95% CI)", CHANNEL: "difference, per-channel gamma (95% CI)"}
DEFAULT_SEEDS = 10
README_SECTION = "demo-table"
SPLITS = ("test", "validation")
# The validation carve-out: a quarter of each target class (at least one image; the smallest class has 6).
VALIDATION_RATIO = 0.25


def validation_tasks(tasks, seed: int):
    """``tasks`` (:class:`metapeft.data.digits.DigitsTasks`) with a stratified :data:`VALIDATION_RATIO` sample of the
    target training images as ``target_test`` and the rest as ``target_train`` (``target_counts`` recounted); the
    target test images are not used."""
    from dataclasses import replace

    from metapeft.data.digits import TensorImageDataset
    from metapeft.data.sampling import stratified_subset

    train = tasks.target_train
    pool = torch.arange(len(train))
    held = stratified_subset(pool, train.labels, VALIDATION_RATIO, torch.Generator().manual_seed(10_000 + seed))
    kept = pool[~torch.isin(pool, held)]
    counts = torch.bincount(train.labels[kept], minlength=len(tasks.target_counts)).tolist()
    return replace(tasks, target_train=TensorImageDataset(train.images[kept], train.labels[kept]),
                   target_test=TensorImageDataset(train.images[held], train.labels[held]), target_counts=counts)


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

    from metapeft.atomic_files import save_safetensors

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


@dataclass(frozen=True)
class DemoTask:
    """The demo's fine-tuning task as a :class:`metapeft.sweep.Task`: the cached source backbone, LoRA of the
    size's rank on every position of every block (a cell's ``peft`` overrides :func:`metapeft.inject` arguments),
    the demo's trainer recipe (a cell's ``train`` overrides :class:`metapeft.TrainerConfig` fields), the target task.

    ``eval_each_epoch`` evaluates (and logs) the target test set after every epoch, inside the timed fit; otherwise
    once after it. ``data_seed`` fixes the data split and the backbone's pre-training; ``imbalance`` and ``looks``
    (the speckle's look number: lower is noisier) shape the target task (:func:`metapeft.data.digits.digits_tasks`).
    ``split="validation"`` carves a stratified :data:`VALIDATION_RATIO` of the target *training* images out as the
    evaluation set and fine-tunes on the rest: choices (defaults, schedules) are made there, never on the test set.
    """

    size: DemoSize = FULL
    cache_dir: str | None = None
    eval_each_epoch: bool = False
    data_seed: int = 0
    split: str = "test"
    imbalance: float = 10.0
    looks: float = 4.0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    def tasks(self):
        """The digits tasks (:func:`metapeft.data.digits.digits_tasks`) of ``data_seed``; with
        ``split="validation"`` :func:`validation_tasks` of them."""
        from metapeft.data.digits import digits_tasks

        tasks = digits_tasks(imbalance=self.imbalance, seed=self.data_seed, looks=self.looks)
        return validation_tasks(tasks, self.data_seed) if self.split == "validation" else tasks

    def _cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def prepare(self) -> str:
        """Pre-train and cache the source backbone unless cached; a note on what happened and its accuracies."""
        tasks = self.tasks()
        backbone, note = cached_backbone(self.size, tasks, self._cache(), self.data_seed)
        return (f"{note}; source test accuracy {100 * accuracy(backbone, tasks.source_test):.1f}%, target test "
                f"accuracy before fine-tuning (source head) {100 * accuracy(backbone, tasks.target_test):.1f}%")

    def layout(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(blocks, LoRA positions) of the demo ViT."""
        from metapeft.inject import POSITIONS

        return tuple(str(i) for i in range(self.size.depth)), POSITIONS["lora"]

    def trainer_config(self, cell: Cell, run_dir: Path):
        """The :class:`metapeft.TrainerConfig` of ``cell``: the demo's recipe updated by ``cell.train``."""
        from metapeft.trainer import TrainerConfig

        train = {"epochs": self.size.finetune_epochs, "batch_size": self.size.batch_size, "lr": self.size.lr,
                 "meta_lr": self.size.meta_lr, **cell.train}
        return TrainerConfig(**train, device="cpu", amp="none", seed=cell.seed, progress=False, log_every=1,
                             output_dir=str(run_dir), resume=True,
                             class_split=class_split_from_counts(self.tasks().target_counts, many=MANY_ABOVE,
                                                                 few=FEW_BELOW))

    def run(self, cell: Cell, run_dir: Path) -> dict:
        """Fine-tune for ``cell`` in ``run_dir``: :func:`metapeft.sweep.fit_and_evaluate`'s result."""
        from metapeft.inject import inject
        from metapeft.trainer import MetaPEFTTrainer

        tasks = self.tasks()
        model, _ = cached_backbone(self.size, tasks, self._cache(), self.data_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cell.seed)  # every variant of a seed starts from the same LoRA weights
            inject(model, **{"method": "lora", "rank": self.size.rank, **cell.peft})
        resumed = (run_dir / "checkpoint.pt").is_file()
        trainer = MetaPEFTTrainer(model, tasks.target_train, config=self.trainer_config(cell, run_dir))
        return fit_and_evaluate(trainer, tasks.target_test, self.eval_each_epoch, resumed)


def read_log(path: Path) -> list[dict]:
    """The trainer's JSONL log as a list of records."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _mean_by(records: list[dict], event: str, x: str, y: str) -> tuple[list, list[float]]:
    """Mean of ``y`` over the records of ``event`` grouped by ``x`` (e.g. per step over seeds)."""
    groups: dict = {}
    for record in records:
        if record["event"] == event and record.get(y) is not None:
            groups.setdefault(record[x], []).append(record[y])
    xs = sorted(groups)
    return xs, [sum(groups[v]) / len(groups[v]) for v in xs]


def plot_curves(logs: dict[str, list[dict]], path: Path, seeds: int) -> Path:
    """Training loss per step and target test accuracy (overall, few) per epoch of each variant, averaged over the
    seeds' logs (``logs``: variant -> every seed's log records), as one PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.8))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for (name, records), color in zip(logs.items(), ("tab:blue", "tab:red", "tab:green"), strict=True):
        loss_axes.plot(*_mean_by(records, "step", "global_step", "train_loss"), color=color, lw=1, label=name)
        for metric, style, marker in (("accuracy", "-", "o"), ("few_accuracy", "--", "x")):
            epochs, values = _mean_by(records, "eval", "epoch", metric)
            accuracy_axes.plot(epochs, [100 * v for v in values], color=color, ls=style, marker=marker,
                               label=f"{name}: {'all' if metric == 'accuracy' else 'few'}")
    loss_axes.set(xlabel="step", ylabel="training loss (logit-adjusted)",
                  title=f"training loss (mean of {seeds} seeds)")
    accuracy_axes.set(xlabel="epoch", ylabel="target test accuracy (%)",
                      title=f"target test accuracy (mean of {seeds} seeds)")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("metapeft demo (small scale): LoRA vs LoRA + MetaPEFT on long-tailed, shifted digits")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def seeds_table(runs: dict[str, list[dict]], seconds: dict[str, list[float]]) -> str:
    """The demo's Markdown table: per variant, mean +- std over seeds of every metric (%) and of the fine-tuning
    time; then per MetaPEFT variant the paired difference variant - LoRA with its 95 % t-interval, and the mean
    time ratio."""
    columns = metric_columns([m for values in runs.values() for m in values])
    names = {"accuracy": "overall", "class_mean_accuracy": "class-mean", "macro_f1": "macro-F1"}
    header = ["method", *(names.get(c, c.removesuffix("_accuracy")) for c in columns), "fine-tune time (s)"]
    body = [[name, *(format_summary(summarize([m[c] for m in values])) for c in columns),
             format_summary(summarize(seconds[name]), scale=1.0)] for name, values in runs.items()]
    for name, label in DIFFERENCE_ROWS.items():
        ratios = [b / a for a, b in zip(seconds[BASELINE], seconds[name])]
        body.append([label,
                     *(format_difference(paired_difference([m[c] for m in runs[BASELINE]], [m[c] for m in runs[name]]))
                       for c in columns),
                     f"{summarize(ratios).mean:.2f}x"])
    lines = ["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def verdict(difference: dict, what: str, method: str = "MetaPEFT") -> str:
    """One sentence on a paired difference (a :class:`metapeft.stats.PairedDifference` as a dict) of ``what``,
    ``method`` - LoRA."""
    interval = "" if difference["low"] is None else \
        f", 95 % interval [{100 * difference['low']:+.1f}, {100 * difference['high']:+.1f}]"
    if difference["low"] is None:
        reading = "one seed gives no interval"
    elif difference["low"] > 0:
        reading = f"{method} is better beyond the seeds' noise"
    elif difference["high"] < 0:
        reading = f"{method} is worse beyond the seeds' noise"
    else:
        reading = "the interval covers 0: these seeds cannot tell the two apart"
    return f"{what}: {method} - LoRA = {100 * difference['mean']:+.1f} points{interval}; {reading}."


def readme_text(result: dict) -> str:
    """The README's demo section (between its ``demo-table`` markers) from a demo ``results.json``."""
    seeds, size = result["seeds"], result["size"]
    options = (" --quick" if size != asdict(FULL) else "") + f" --seeds {len(seeds)}" + (
        f" --seed {seeds[0]}" if seeds[0] else "")
    return (f"`metapeft demo{options}` (seeds {seeds[0]}-{seeds[-1]}; target test set, "
            f"accuracy in %, mean +- std over seeds; difference: MetaPEFT - LoRA per seed, mean and 95 % t-interval "
            f"(per-channel gamma: `gamma=\"channel\"`, one gamma per output channel); time ratio: mean over seeds of "
            f"MetaPEFT / LoRA fine-tuning time; generated from `results.json` by "
            f"`metapeft demo --readme README.md`):\n\n{result['table']}\n\n"
            f"{verdict(result['difference']['accuracy'], 'Overall accuracy')} "
            f"{verdict(result['difference']['few_accuracy'], 'Few-shot classes')} "
            f"{verdict(result['difference_channel']['accuracy'], 'Per-channel gamma, overall', 'per-channel')}\n")


def update_readme(result: dict, readme: str | os.PathLike) -> Path:
    """Rewrite the demo table section of ``readme`` (:func:`metapeft.report.replace_section`) from ``result``."""
    return replace_section(readme, README_SECTION, readme_text(result))


def run_demo(quick: bool = False, output_dir: str | os.PathLike = "metapeft-demo",
             cache_dir: str | os.PathLike | None = None, threads: int = 1, seed: int = 0, seeds: int = DEFAULT_SEEDS,
             jobs: int = 1, readme: str | os.PathLike | None = None) -> dict:
    """Run the demo (module docstring) over seeds ``seed .. seed + seeds - 1``; returns the ``results.json`` dict
    (``runs``: per-variant metrics per seed, ``seconds``, ``summary``, ``difference``, ``table``, ``files``...).

    quick: a tiny model and schedule (the test suite's smoke run). threads: torch threads per run; jobs: runs in
    parallel processes. readme: a README whose demo section to rewrite from the results.
    """
    size = QUICK if quick else FULL
    output_dir = Path(output_dir)
    task = DemoTask(size, None if cache_dir is None else str(cache_dir), eval_each_epoch=True)
    seed_list = list(range(seed, seed + seeds))
    print(BANNER)
    tasks = task.tasks()
    class_split = class_split_from_counts(tasks.target_counts, many=MANY_ABOVE, few=FEW_BELOW)
    print(f"source: {len(tasks.source_train)} training images (balanced); target: {len(tasks.target_train)} "
          f"training images per class {tasks.target_counts}, {len(tasks.target_test)} test images (balanced); "
          f"groups: many > {MANY_ABOVE}, few < {FEW_BELOW} training images; fine-tuning seeds {seed_list}")
    start = time.perf_counter()
    records = run_grid(task, with_seeds(VARIANTS, seed_list), output_dir, jobs=jobs, threads=threads, fresh=True)
    by_variant = {cell.point["method"]: [r for r in records if r["cell"]["name"] == cell.name] for cell in VARIANTS}
    runs = {name: [r["metrics"] for r in rs] for name, rs in by_variant.items()}
    seconds = {name: [r["seconds"] for r in rs] for name, rs in by_variant.items()}
    gamma = GammaTable.mean([r["gamma"] for r in by_variant[METHOD]])
    logs = {name: [line for cell in VARIANTS if cell.point["method"] == name
                   for s in seed_list for line in read_log(output_dir / Cell(cell.name, {}, s).key / "metrics.jsonl")]
            for name in runs}
    files = {"gamma_heatmap": plot_gamma(gamma, output_dir / "gamma_heatmap.png",
                                         title=f"demo: learned gamma, mean of {seeds} seeds"),
             "training_curves": str(plot_curves(logs, output_dir / "training_curves.png", seeds))}
    table = seeds_table(runs, seconds)
    columns = metric_columns([m for values in runs.values() for m in values])
    result = {"seeds": seed_list, "runs": runs, "seconds": seconds, "table": table,
              "summary": {name: {c: asdict(summarize([m[c] for m in values])) for c in columns}
                          for name, values in runs.items()},
              **{key: {c: asdict(paired_difference([m[c] for m in runs[BASELINE]], [m[c] for m in runs[name]]))
                       for c in columns}
                 for key, name in (("difference", METHOD), ("difference_channel", CHANNEL))},
              "gamma_mean": gamma.to_dict(), "files": files, "size": asdict(size), "threads": threads, "jobs": jobs,
              "target_counts": tasks.target_counts, "class_split": class_split,
              "wall_seconds": time.perf_counter() - start}
    print(f"\nTarget test set ({len(tasks.target_test)} images, balanced), accuracy in %, mean +- std over "
          f"{seeds} seeds; difference = MetaPEFT (per module or per channel) - LoRA per seed (95% t-interval):\n"
          f"{table}\n")
    print(f"learned gamma, mean over seeds (rows: block, columns: position; plain LoRA keeps gamma = 1):\n{gamma}\n")
    print(f"wrote {files['gamma_heatmap']} and {files['training_curves']}")
    print("This is a small-scale demonstration on toy data; the paper's settings are in configs/ "
          "(metapeft train --config ...).")
    write_json(output_dir / "results.json", result)
    write_text(output_dir / "results.md", f"{BANNER}\n\n{readme_text(result)}\ngamma (mean over seeds):\n\n"
                                          f"```\n{gamma}\n```\n")
    if readme is not None:
        print(f"rewrote the demo section of {update_readme(result, readme)}")
    return result
