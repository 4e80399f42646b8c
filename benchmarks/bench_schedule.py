"""Meta schedules on the demo task: test accuracy (overall, few) and fine-tuning time of LoRA + MetaPEFT for every
hypergradient mode x meta interval, the authors' schedule, and plain LoRA, over seeds.

Run: ``python benchmarks/bench_schedule.py`` (``--quick``: the demo's tiny size and 2 seeds, a smoke run). Task:
``metapeft demo``'s (:class:`metapeft.demo.DemoTask`: a 4-block, dim-64 ViT pre-trained on upright digits,
fine-tuned 15 epochs of 8 steps on the long-tailed shifted digits, LoRA r=4 on q, k, v, out, mlp1, mlp2), one torch
thread per run, evaluated once after fine-tuning. Schedules:

- ``plain``: LoRA with a fixed scale (``meta: false``), the time reference;
- ``<mode> every <n>``: one meta step (mode exact / finite_difference / first_order, one-step look-ahead) every n
  inner steps, n in 1, 2, 5, 10 and ``epoch`` (8 steps here);
- ``authors``: what the authors' code runs: first-order, a 3-step look-ahead (``meta_lookahead_steps``), once per epoch;
- ``shipped defaults``: the meta schedule of ``TrainerConfig()`` (the demo's meta learning rate).

Seeds are the outer loop, so each seed's schedules run back to back on the same machine load; time ratios are the
mean over seeds of the per-seed ratio to plain LoRA, for wall time and for the process CPU time (one thread: CPU
time barely moves with the load of the shared machine, wall time does). Each run lives in ``--output-dir`` and is
skipped when done (rerunning resumes). Full-size results are appended to ``benchmarks/results/schedule_cpu.json``
and ``.md``; ``--readme README.md`` also rewrites the README's schedule section. ``--defaults`` runs only plain
LoRA, the paper's schedule, the shipped defaults and the authors' schedule: the trainer-time benchmark of the shipped
defaults vs ``meta: false`` (``benchmarks/results/meta_defaults_cpu.*``, README section ``defaults-table``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import markdown_table, record_results  # noqa: E402
from metapeft.demo import FULL, QUICK, DemoTask  # noqa: E402
from metapeft.report import replace_section  # noqa: E402
from metapeft.stats import format_difference, format_summary, paired_difference, summarize  # noqa: E402
from metapeft.sweep import META, PLAIN, Cell, run_grid, with_seeds  # noqa: E402
from metapeft.trainer import TrainerConfig  # noqa: E402

MODES = ("exact", "finite_difference", "first_order")
INTERVALS = (1, 2, 5, 10, "epoch")
AUTHORS_LOOKAHEAD = 3
SCHEDULE_SECTION, DEFAULTS_SECTION = "schedule-table", "defaults-table"
SCHEDULE_FIELDS = ("meta_mode", "meta_interval", "meta_lookahead_steps")


def schedule_cells() -> list[Cell]:
    """Plain LoRA, every mode x interval, the authors' schedule and the trainer's shipped defaults (grid points,
    seed 0)."""
    defaults, fields = TrainerConfig(), {f.name for f in dataclasses.fields(TrainerConfig)}
    has_lookahead = "meta_lookahead_steps" in fields
    authors = {**META, "meta_mode": "first_order", "meta_interval": "epoch"}
    if has_lookahead:
        authors["meta_lookahead_steps"] = AUTHORS_LOOKAHEAD
    cells = [Cell("plain", {"schedule": "plain LoRA"}, peft=PLAIN, train=PLAIN)]
    cells += [Cell(f"{mode}_every_{n}", {"schedule": f"{mode} every {n}"}, peft=META,
                   train={**META, "meta_mode": mode, "meta_interval": n}) for mode in MODES for n in INTERVALS]
    label = f"authors: first_order, K={AUTHORS_LOOKAHEAD}, every epoch" if has_lookahead else \
        "authors: first_order, every epoch (K=1: no meta_lookahead_steps)"
    return cells + [Cell(f"authors_k{authors.get('meta_lookahead_steps', 1)}", {"schedule": label}, peft=META,
                         train=authors),
                    Cell("shipped_defaults", {"schedule": "shipped defaults (TrainerConfig)"}, peft=META,
                         train={**META, **{k: getattr(defaults, k) for k in SCHEDULE_FIELDS if k in fields
                                           and (k != "meta_lookahead_steps" or getattr(defaults, k) != 1)}})]


def schedule_rows(records: list[dict], cells: list[Cell]) -> list[dict]:
    """One row per schedule: accuracy and few accuracy (mean +- std, paired difference to plain LoRA with its 95 %
    t-interval) and fine-tuning time (mean, ratio to plain LoRA)."""
    by_name = {cell.name: [r for r in records if r["cell"]["name"] == cell.name] for cell in cells}
    plain = by_name["plain"]
    rows = []
    for cell in cells:
        runs = by_name[cell.name]
        row = {"schedule": cell.point["schedule"]}
        for metric, label in (("accuracy", "overall %"), ("few_accuracy", "few %")):
            values = [r["metrics"][metric] for r in runs]
            row[label] = format_summary(summarize(values))
            row[f"{label} - plain"] = "-" if cell.name == "plain" else format_difference(
                paired_difference([r["metrics"][metric] for r in plain], values))
        for key, label in (("seconds", "wall"), ("cpu_seconds", "CPU")):
            seconds = [r[key] for r in runs]
            row[f"{label} s"] = format_summary(summarize(seconds), scale=1.0)
            row[f"{label} / plain"] = summarize([s / p[key] for s, p in zip(seconds, plain)]).mean
        rows.append(row)
    return rows


def defaults_cells() -> list[Cell]:
    """Plain LoRA (``meta: false``), the paper's schedule (exact, every step), the shipped defaults and the authors'
    schedule."""
    cells = schedule_cells()
    return [cells[0], next(c for c in cells if c.name == "exact_every_1"), cells[-1],
            next(c for c in cells if c.name.startswith("authors"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds 0..N-1 (default 3)")
    parser.add_argument("--defaults", action="store_true", help="only plain LoRA, the paper's schedule, the "
                                                                "shipped defaults and the authors' schedule "
                                                                "(results: meta_defaults_cpu)")
    parser.add_argument("--quick", action="store_true", help="the demo's tiny size, 2 seeds (smoke run)")
    parser.add_argument("--output-dir", default="runs/bench_schedule", help="where the runs live (resumable)")
    parser.add_argument("--cache-dir", help="the demo's backbone cache (default $METAPEFT_CACHE or ~/.cache)")
    parser.add_argument("--readme", help="also rewrite this README's section of the table")
    args = parser.parse_args(argv)
    size, seeds = (QUICK, 2) if args.quick else (FULL, args.seeds)
    task = DemoTask(size, args.cache_dir)
    cells = defaults_cells() if args.defaults else schedule_cells()
    records = run_grid(task, with_seeds(cells, range(seeds)), Path(args.output_dir) / ("quick" if args.quick else
                                                                                     "full"))
    rows = schedule_rows(records, cells)
    command = "python benchmarks/bench_schedule.py" + (" --defaults" if args.defaults else "") + (
        " --quick" if args.quick else f" --seeds {seeds}")
    what = "MetaPEFT with the shipped defaults vs plain LoRA" if args.defaults else "Meta schedules"
    title = (f"{what} on the demo task ({'quick' if args.quick else 'full'} size, {seeds} seeds, 1 thread per run, "
             f"shared and loaded machine): accuracy and fine-tuning time")
    if not args.quick:
        record_results("meta_defaults_cpu" if args.defaults else "schedule_cpu", rows, title, command)
    table = markdown_table(rows)
    print(table)
    if args.readme:
        replace_section(args.readme, DEFAULTS_SECTION if args.defaults else SCHEDULE_SECTION,
                        f"`{command}` ({seeds} seeds; mean +- std; differences: paired per seed with the 95 % "
                        f"t-interval):\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
