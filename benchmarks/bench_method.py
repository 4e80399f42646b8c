"""Does the modulator earn its place? Issue-19 evidence on the demo task (and a second digits task), over many seeds.

Run: ``python benchmarks/bench_method.py --split test --seeds 20 --seed 300`` (the confirmation: seeds that played no
part in choosing anything) or ``--split validation --seed 100`` (where choices are made: a stratified quarter of the
target *training* images, :func:`metapeft.demo.validation_tasks`). ``--quick``: the demo's tiny size, 2 seeds, a
smoke run. ``--task shifted`` runs the second task: imbalance 50 instead of 10 and heavy speckle (looks 1 instead
of 4) on another data split (``data_seed`` 1). Every arm runs on every seed (seeds are the outer loop) and is compared
with its reference arm on the same seeds: the paired difference with its 95 % t-interval (:mod:`metapeft.stats`).

Arms (LoRA r = 4 on q, k, v, out, mlp1, mlp2 of every block; ``alpha = r`` is the shipped scale):

- ``no harm``: plain LoRA vs LoRA + MetaPEFT with the shipped defaults;
- ``scale x8`` / ``scale /8``: LoRA with alpha = 8r / r/8, plain and with MetaPEFT (shipped defaults, whose
  common-scale warm-up halves every gamma while the scale overshoots, and without that warm-up,
  ``meta_warmup_steps=0``), each against plain LoRA at alpha = r (the rescue target: >= 90 % of its accuracy);
- ``adaptformer x8``: AdaptFormer (bottleneck 8) at 8x its default scale (alpha = 1), plain and with MetaPEFT, against
  plain AdaptFormer at alpha = 1.

Results (accuracy and few-shot accuracy per arm, paired differences, worst seeds, diverged runs) are appended to
``benchmarks/results/method_<task>_<split>.json`` and ``.md``. Runs live in ``--work-dir`` and are skipped when done.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import record_results  # noqa: E402
from metapeft.demo import FULL, QUICK, DemoTask  # noqa: E402
from metapeft.stats import format_difference, format_summary, paired_difference, summarize  # noqa: E402
from metapeft.sweep import META, PLAIN, Cell, run_grid, with_seeds  # noqa: E402

NO_WARMUP = {"meta_warmup_steps": 0}
ADAPTFORMER = {"method": "adaptformer", "rank": 8}
TASKS = {"demo": {}, "shifted": {"imbalance": 50.0, "looks": 1.0, "data_seed": 1}}


def arm(name: str, alpha_factor: float, meta: bool, train: dict | None = None, peft: dict | None = None) -> Cell:
    """One arm: LoRA (or ``peft``'s method) at ``alpha_factor`` times its reference scale, plain or MetaPEFT."""
    flags = META if meta else PLAIN
    return Cell(name, {"arm": name, "alpha_factor": alpha_factor},
                peft={**flags, **(peft or {}), "alpha_factor": alpha_factor}, train={**flags, **(train or {})})


# (arm, reference arm) pairs in table order; the reference of a group is its first row
GROUPS = {
    "no harm": [arm("LoRA", 1, False), arm("LoRA + MetaPEFT", 1, True),
                arm("LoRA + MetaPEFT, no warm-up", 1, True, NO_WARMUP)],
    "scale x8": [arm("LoRA", 1, False), arm("LoRA alpha x8", 8, False), arm("LoRA + MetaPEFT alpha x8", 8, True),
                 arm("LoRA + MetaPEFT, no warm-up, alpha x8", 8, True, NO_WARMUP)],
    "scale /8": [arm("LoRA", 1, False), arm("LoRA alpha /8", 1 / 8, False),
                 arm("LoRA + MetaPEFT alpha /8", 1 / 8, True),
                 arm("LoRA + MetaPEFT, no warm-up, alpha /8", 1 / 8, True, NO_WARMUP)],
    "adaptformer x8": [arm("AdaptFormer", 1, False, peft=ADAPTFORMER),
                       arm("AdaptFormer alpha x8", 8, False, peft=ADAPTFORMER),
                       arm("AdaptFormer + MetaPEFT alpha x8", 8, True, peft=ADAPTFORMER),
                       arm("AdaptFormer + MetaPEFT, no warm-up, alpha x8", 8, True, NO_WARMUP, peft=ADAPTFORMER)],
}


@dataclasses.dataclass(frozen=True)
class ScaledTask(DemoTask):
    """:class:`DemoTask` whose cells give alpha as ``alpha_factor`` times the method's default scale (LoRA: the
    rank; adapters: 1)."""

    def run(self, cell: Cell, run_dir: Path) -> dict:
        """Fine-tune ``cell`` with its ``alpha_factor`` turned into ``alpha``."""
        peft = dict(cell.peft)
        factor = peft.pop("alpha_factor")
        reference = 1.0 if peft.get("method") == "adaptformer" else peft.get("rank", self.size.rank)
        return super().run(dataclasses.replace(cell, peft={**peft, "alpha": factor * reference}), run_dir)


def cells() -> list[Cell]:
    """Every distinct arm of :data:`GROUPS` once (seed 0)."""
    return list({c.name: c for group in GROUPS.values() for c in group}.values())


def summarize_group(records: dict[str, list[dict]], group: list[Cell]) -> list[dict]:
    """One row per arm of ``group``: accuracy and few-shot accuracy (mean +- std, %), the paired difference to the
    group's reference (first arm) with its 95 % interval, the ratio of mean accuracies, worst seed, diverged runs."""
    reference = records[group[0].name]
    rows = []
    for cell in group:
        runs = records[cell.name]
        accuracy = [r["metrics"]["accuracy"] for r in runs]
        few = [r["metrics"]["few_accuracy"] for r in runs]
        row = {"arm": cell.name, "seeds": len(runs), "accuracy %": format_summary(summarize(accuracy)),
               "few %": format_summary(summarize(few)), "worst seed %": f"{100 * min(accuracy):.1f}",
               "diverged": sum(1 for r in runs if r.get("diverged"))}
        if cell is not group[0]:
            ref_accuracy = [r["metrics"]["accuracy"] for r in reference]
            row["- reference, accuracy"] = format_difference(paired_difference(ref_accuracy, accuracy))
            row["- reference, few"] = format_difference(
                paired_difference([r["metrics"]["few_accuracy"] for r in reference], few))
            row["/ reference"] = f"{summarize(accuracy).mean / summarize(ref_accuracy).mean:.2f}"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--task", choices=tuple(TASKS), default="demo")
    parser.add_argument("--seed", type=int, default=300, help="first seed")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--groups", nargs="+", choices=tuple(GROUPS), default=tuple(GROUPS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work-dir", default="metapeft-method")
    args = parser.parse_args()
    seeds = list(range(args.seed, args.seed + (2 if args.quick else args.seeds)))
    task = ScaledTask(QUICK if args.quick else FULL, split=args.split, **TASKS[args.task])
    chosen = {name: GROUPS[name] for name in args.groups}
    grid = list({c.name: c for group in chosen.values() for c in group}.values())
    work = Path(args.work_dir) / f"{args.task}_{args.split}"
    records = run_grid(task, with_seeds(grid, seeds), work, jobs=args.jobs)
    by_arm = {c.name: [r for r in records if r["cell"]["name"] == c.name] for c in grid}
    rows = []
    for name, group in chosen.items():
        for row in summarize_group(by_arm, group):
            rows.append({"group": name, **row})
    if not args.quick:
        record_results(f"method_{args.task}_{args.split}", rows,
                       f"MetaPEFT evidence, {args.task} task, {args.split} split, seeds {seeds[0]}-{seeds[-1]}")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
