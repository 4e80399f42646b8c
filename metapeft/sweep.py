"""``metapeft sweep``: the paper's analyses as resumable grids of fine-tuning runs.

A *task* fine-tunes one model for a :class:`Cell` (overrides of the PEFT injection and of the trainer config, and a
seed) and returns its test metrics: the demo's digits task (:class:`metapeft.demo.DemoTask`) or any training config
(:class:`ConfigTask`). A *sweep* is a grid of cells, each grid point repeated over the seeds:

- ``positions``: plain PEFT at one (block, position) at a time, for every block x position, and one MetaPEFT run;
  plot: the accuracy heatmap (position x depth) beside the MetaPEFT run's learned-gamma heatmap.
- ``alpha``: PEFT at one position (every block) with alpha = 2^k, plain and / or with MetaPEFT (``methods``), or
  at every position at once (position ``all``); plot: accuracy vs log2(alpha), a line per position and method.
- ``meta_ratio``: MetaPEFT with each meta-set ratio, and plain PEFT; plot: accuracy and fine-tuning time vs ratio.
- ``meta_interval``: MetaPEFT with each meta interval (inner steps per meta step, or ``epoch``) per hypergradient
  mode, and plain PEFT; plot: accuracy and fine-tuning time vs interval, a line per mode.

Each cell runs in its own directory ``OUTPUT/<point>/seed_<s>/`` and ends by writing ``result.json`` atomically. A
cell whose ``result.json`` exists is skipped, so a sweep stopped half way resumes where it stopped (the interrupted
cell itself continues from its trainer checkpoint). Seeds are the outer loop: the grid points of one seed run side by
side, so time ratios within a seed see the same machine load. ``jobs > 1`` runs cells in that many spawned processes.
The results are written beside the plot as ``results.csv`` (one row per cell), ``results.json`` (cells and summary)
and ``results.md`` (mean +- std over seeds per grid point). A run that diverges does not stop the grid: its cell
records the step and cause and scores chance level (:func:`fit_and_evaluate`); tables count the diverged seeds of
each grid point and plots mark the points where any seed diverged.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from metapeft.report import write_json, write_text
from metapeft.stats import Summary, format_summary, summarize

KINDS = ("positions", "alpha", "meta_ratio", "meta_interval")
METHODS = ("plain", "meta")
ALL_POSITIONS = "all"
RESULT_NAME = "result.json"
DEFAULT_LOG2_ALPHA = (-2, 0, 2, 4, 6)
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.5)
DEFAULT_INTERVALS = (1, 2, 5, 10, "epoch")
# summary columns beside the group accuracies the metrics carry (few / tail, ...)
HEADLINE_METRICS = ("accuracy", "class_mean_accuracy")
PLAIN, META = {"meta": False}, {"meta": True}
TIMES = ("seconds", "cpu_seconds")


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run of a sweep.

    ``name``: the grid point's directory name; ``point``: its coordinates in the results table (e.g.
    ``{"block": "3", "position": "q"}``); ``peft``: :func:`metapeft.inject` arguments and ``train``:
    :class:`metapeft.TrainerConfig` fields overriding the task's own (``train["meta_interval"] = "epoch"`` means
    one meta step per epoch); ``seed``: the run's seed.
    """

    name: str
    point: dict
    seed: int = 0
    peft: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The cell's directory relative to the sweep's output directory."""
        return f"{self.name}/seed_{self.seed}"

    def to_dict(self) -> dict:
        """A JSON-normal copy (tuples as lists), as stored in ``result.json``."""
        return json.loads(json.dumps(asdict(self)))


class Task(Protocol):
    """What a sweep trains: one fine-tuning run per :class:`Cell`. Tasks are picklable (``jobs > 1`` sends them to
    worker processes)."""

    def prepare(self) -> str:
        """Work shared by every cell, done once in the calling process before any cell runs (e.g. pre-training a
        backbone); returns a one-line note."""

    def layout(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(blocks, positions)`` the task's PEFT modules can occupy (the rows and columns of its gamma table)."""

    def run(self, cell: Cell, run_dir: Path) -> dict:
        """Fine-tune for ``cell`` in ``run_dir`` (resuming from a checkpoint there); returns
        :func:`fit_and_evaluate`'s result."""


@dataclass(frozen=True)
class ConfigTask:
    """A run config (:mod:`metapeft.runs.config`) as a sweep task. A cell's ``peft`` / ``train`` values update the
    config's sections; its seed becomes ``train.seed`` and ``model.seed`` (the PEFT initialisation, and a random
    backbone's). Each cell is a run directory (:func:`metapeft.runs.directory.prepare_run`) evaluated on the config's
    test split after fine-tuning (every epoch too with ``eval_each_epoch``). Relative data paths resolve against
    ``base_dir``."""

    config: dict
    base_dir: str = "."

    def prepare(self) -> str:
        """Nothing to share between cells; names the backbone and the data."""
        model, data = self.config.get("model") or {}, self.config.get("data") or {}
        return f"sweeping {model.get('name')!r} on {data.get('kind')} data at {data.get('root')}"

    def layout(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Blocks and the config's PEFT positions, read from the model built without its pre-trained weights."""
        from metapeft.inject import injection_config
        from metapeft.runs.builders import build_model

        model = {**(self.config.get("model") or {}), "pretrained": False, "weights": None}
        placed = injection_config(build_model({**self.config, "model": model}, num_classes=2)[0])
        return placed.rows, placed.positions or placed.columns

    def run(self, cell: Cell, run_dir: Path) -> dict:
        """Fine-tune the config updated by ``cell`` in ``run_dir``: :func:`fit_and_evaluate`'s result."""
        from metapeft.runs.directory import prepare_run
        from metapeft.trainer import MetaPEFTTrainer

        config = {**self.config, "model": {**(self.config.get("model") or {}), "seed": cell.seed},
                  "peft": {**(self.config.get("peft") or {}), **cell.peft},
                  "train": {**(self.config.get("train") or {}), **cell.train, "seed": cell.seed, "progress": False}}
        resumed = (run_dir / "checkpoint.pt").is_file()
        run = prepare_run(config, run_dir, resume=resumed, base_dir=self.base_dir)
        trainer = MetaPEFTTrainer(run.model, run.data.train, config=run.trainer_config)
        return fit_and_evaluate(trainer, run.data.test, run.eval_each_epoch, resumed)


def fit_and_evaluate(trainer, test_set, eval_each_epoch: bool = False, resumed: bool = False) -> dict:
    """Fit ``trainer`` (a :class:`metapeft.MetaPEFTTrainer`) and evaluate it on ``test_set``: a task's result
    ``{"metrics", "seconds", "cpu_seconds", "resumed", "gamma", "diverged"}``. ``seconds`` / ``cpu_seconds``: wall
    and process CPU time of the fit (with a per-epoch evaluation inside it when ``eval_each_epoch``); a one-thread
    run's CPU time barely moves with the machine's load, its wall time does. ``gamma``: the learned gamma table
    (:meth:`metapeft.gamma.GammaTable.to_dict`) when the run meta-learned, else None.

    A run that diverges (the trainer's :class:`~metapeft.trainer.nonfinite.NonFiniteError`) is a result, not a
    crash: ``diverged`` is ``{"step", "cause"}`` (else None), ``metrics`` are chance level
    (:func:`metapeft.metrics.chance_metrics` on the test labels) and ``gamma`` is None."""
    from metapeft.data.sampling import dataset_labels
    from metapeft.gamma import gamma_table
    from metapeft.metrics import chance_metrics
    from metapeft.trainer.nonfinite import NonFiniteError

    start, cpu_start = time.perf_counter(), time.process_time()
    diverged = None
    try:
        metrics = trainer.fit(eval_set=test_set if eval_each_epoch else None)
    except NonFiniteError as error:
        diverged = {"step": error.global_step, "cause": error.cause}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if diverged is not None:
        metrics = chance_metrics(dataset_labels(test_set), trainer.num_classes, trainer.class_split)
    elif not eval_each_epoch:
        metrics = trainer.evaluate(test_set)
    gamma = gamma_table(trainer.model).to_dict() if trainer.rho and diverged is None else None
    return {"metrics": metrics, "seconds": seconds, "cpu_seconds": cpu_seconds, "resumed": resumed, "gamma": gamma,
            "diverged": diverged}


def with_seeds(points: Sequence[Cell], seeds: Sequence[int]) -> list[Cell]:
    """Every grid point (a :class:`Cell` with seed 0) once per seed, seeds the outer loop."""
    return [Cell(p.name, p.point, seed, p.peft, p.train) for seed in seeds for p in points]


# ----- grids --------------------------------------------------------------------------------------------------------
def position_cells(blocks: Sequence[str], positions: Sequence[str]) -> list[Cell]:
    """Plain PEFT at a single (block, position), for every block x position, and one MetaPEFT run on the task's
    own placement (its learned gamma is plotted beside the accuracy map)."""
    cells = [Cell(f"block_{b}_{p}", {"meta": False, "block": b, "position": p},
                  peft={**PLAIN, "positions": [p], "layers": [int(b)]}, train=PLAIN)
             for b in blocks for p in positions]
    return cells + [Cell("metapeft", {"meta": True, "block": "all", "position": "all"}, peft=META, train=META)]


def alpha_cells(positions: Sequence[str], log2_alpha: Sequence[float], methods: Sequence[str] = ("plain",)
                ) -> list[Cell]:
    """PEFT at one position (every block; :data:`ALL_POSITIONS`: every position at once) with alpha = 2^k, for every
    method (``"plain"``: fixed scale, ``"meta"``: MetaPEFT with the task's meta schedule) x position x k."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    cells = []
    for m in methods:
        flags = META if m == "meta" else PLAIN
        for p in positions:
            placement = {} if p == ALL_POSITIONS else {"positions": [p]}
            cells += [Cell(f"{m}_{p}_log2alpha_{k:g}", {"method": m, "position": p, "log2_alpha": k},
                           peft={**flags, **placement, "alpha": 2.0 ** k}, train=flags) for k in log2_alpha]
    return cells


def meta_ratio_cells(ratios: Sequence[float]) -> list[Cell]:
    """MetaPEFT with each meta-set ratio, and plain PEFT (ratio ``-``)."""
    return [Cell("plain", {"meta": False, "meta_ratio": "-"}, peft=PLAIN, train=PLAIN)] + [
        Cell(f"meta_ratio_{r:g}", {"meta": True, "meta_ratio": r}, peft=META, train={**META, "meta_ratio": r})
        for r in ratios]


def meta_interval_cells(intervals: Sequence[int | str], modes: Sequence[str] | None = None) -> list[Cell]:
    """MetaPEFT with each hypergradient mode x meta interval (inner steps per meta step, or ``"epoch"``), and plain
    PEFT (mode and interval ``-``). Without ``modes`` the task's own mode is kept (mode ``task``)."""
    plain = Cell("plain", {"meta": False, "meta_mode": "-", "meta_interval": "-"}, peft=PLAIN, train=PLAIN)
    return [plain] + [
        Cell(f"{m or 'task'}_every_{i}", {"meta": True, "meta_mode": m or "task", "meta_interval": i}, peft=META,
             train={**META, **({"meta_mode": m} if m else {}), "meta_interval": i})
        for m in (modes or [None]) for i in intervals]


def parse_interval(text: str) -> int | str:
    """A meta interval from the command line: a positive integer or ``epoch``."""
    if text == "epoch":
        return text
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise ValueError(f"a meta interval is a positive integer or 'epoch', got {text!r}")
    return value


def parse_values(kind: str, texts: Sequence[str]) -> list:
    """The swept values of ``kind`` from command-line words: log2(alpha) numbers, meta ratios in (0, 1), or meta
    intervals (:func:`parse_interval`); errors name the value."""
    if kind == "meta_interval":
        return [parse_interval(text) for text in texts]
    values = []
    for text in texts:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{kind} values are numbers, got {text!r}") from None
        if kind == "meta_ratio" and not 0.0 < value < 1.0:
            raise ValueError(f"a meta ratio lies in (0, 1), got {text!r}")
        values.append(value)
    return values


# ----- running ------------------------------------------------------------------------------------------------------
def read_result(run_dir: Path, cell: Cell) -> dict | None:
    """The finished record of ``cell`` in ``run_dir``, or None when the cell has not finished. A record written for
    another cell is an error (nothing is overwritten silently)."""
    path = run_dir / RESULT_NAME
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("cell") != cell.to_dict():
        raise ValueError(f"{path} holds the result of another run ({record.get('cell')}), not of {cell.to_dict()}; "
                         "use another output directory or delete it")
    return record


def run_cell(task: Task, cell: Cell, run_dir: Path, threads: int = 1) -> dict:
    """Run one cell with ``threads`` torch threads and write its ``result.json``; returns the record."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = task.run(cell, run_dir)
    finally:
        torch.set_num_threads(previous)
    record = {"cell": cell.to_dict(), **result}
    write_json(run_dir / RESULT_NAME, record)
    return record


def run_grid(task: Task, cells: Sequence[Cell], output_dir: str | os.PathLike, jobs: int = 1, threads: int = 1,
             fresh: bool = False, progress: bool = True) -> list[dict]:
    """Run every cell not finished yet (:func:`read_result`) under ``output_dir``, ``jobs`` at a time (separate
    spawned processes when > 1); ``task.prepare()`` and every cell run with ``threads`` torch threads (1 by
    default: tiny matrices gain nothing from more, and results then match bit for bit between runs). ``fresh``
    deletes the cells' directories first. A tqdm bar counts the cells. Returns the records in ``cells`` order."""
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got jobs={jobs!r}, threads={threads!r}")
    keys = [cell.key for cell in cells]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"cells must be distinct, repeated: {repeated}")
    output_dir = Path(output_dir)
    records, pending = {}, []
    for cell in cells:
        if fresh:
            shutil.rmtree(output_dir / cell.key, ignore_errors=True)
        record = read_result(output_dir / cell.key, cell)
        if record is None:
            pending.append(cell)
        else:
            records[cell.key] = record
    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), desc="sweep cells", unit="run",
               disable=not progress)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if pending:
            note = task.prepare()
            if note and progress:
                bar.write(note)
        if jobs == 1:
            for cell in pending:
                bar.set_postfix_str(cell.key)
                records[cell.key] = run_cell(task, cell, output_dir / cell.key, threads)
                bar.update(1)
        elif pending:
            with ProcessPoolExecutor(min(jobs, len(pending)), mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(run_cell, task, cell, output_dir / cell.key, threads) for cell in pending]
                try:
                    for future in as_completed(futures):
                        record = future.result()
                        records[Cell(**record["cell"]).key] = record
                        bar.update(1)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        torch.set_num_threads(previous_threads)
        bar.close()
    return [records[key] for key in keys]


# ----- tables -------------------------------------------------------------------------------------------------------
def metric_columns(metrics: Sequence[dict]) -> list[str]:
    """The keys to tabulate of metrics dicts (:func:`metapeft.metrics.metrics_from_confusion`): overall, class-mean,
    then every group accuracy they carry, macro-F1."""
    groups = []
    for values in metrics:
        groups += [k for k, v in values.items() if k.endswith("_accuracy") and k not in groups
                   and k not in HEADLINE_METRICS and (v is None or isinstance(v, float))]
    return [*HEADLINE_METRICS, *groups, "macro_f1"]


def cell_rows(records: Sequence[dict]) -> list[dict]:
    """One flat row per cell: the point's coordinates, seed, every tabulated metric, fine-tuning wall and CPU
    seconds."""
    columns = metric_columns([r["metrics"] for r in records])
    return [{**r["cell"]["point"], "seed": r["cell"]["seed"], **{c: r["metrics"].get(c) for c in columns},
             "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
             "diverged_at_step": (r.get("diverged") or {}).get("step")} for r in records]


def summary_rows(records: Sequence[dict]) -> list[dict]:
    """Per grid point (first-seen order): coordinates, number of seeds, and mean / std of every tabulated metric
    and of the fine-tuning wall and CPU seconds (``<metric>_mean``, ``<metric>_std``; std None for one seed)."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["cell"]["name"], []).append(record)
    columns = metric_columns([r["metrics"] for r in records])
    rows = []
    for members in groups.values():
        row = {**members[0]["cell"]["point"], "seeds": len(members),
               "diverged": sum(1 for m in members if m.get("diverged"))}
        for column in (*columns, *TIMES):
            values = [m[column] if column in TIMES else m["metrics"].get(column) for m in members]
            summary = summarize(values) if values and None not in values else None
            row[f"{column}_mean"] = None if summary is None else summary.mean
            row[f"{column}_std"] = None if summary is None else summary.std
        rows.append(row)
    return rows


def markdown_summary(rows: Sequence[dict]) -> str:
    """``results.md``'s table: coordinates, seeds, each metric as ``mean +- std`` in %, seconds."""
    if not rows:
        return ""
    coordinates = [k for k in rows[0] if not k.endswith(("_mean", "_std")) and k not in ("seeds", "diverged")]
    metrics = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean") and k[: -len("_mean")] not in TIMES]
    header = [*coordinates, "seeds", "diverged", *(m.removesuffix("_accuracy") for m in metrics), "time (s)",
              "CPU time (s)"]

    def cell(row: dict, metric: str, scale: float) -> str:
        mean = row[f"{metric}_mean"]
        return "-" if mean is None else format_summary(Summary(mean, row[f"{metric}_std"], row["seeds"]), scale)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [str(row[c]) for c in coordinates] + [str(row["seeds"]), str(row.get("diverged", 0))]
        values += [cell(row, m, 100.0) for m in metrics] + [cell(row, t, 1.0) for t in TIMES]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_tables(records: Sequence[dict], output_dir: Path, title: str) -> list[dict]:
    """Write ``results.csv`` / ``results.json`` / ``results.md`` under ``output_dir``; returns the summary rows."""
    rows, summary = cell_rows(records), summary_rows(records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(output_dir / "results.csv", buffer.getvalue())
    write_json(output_dir / "results.json", {"title": title, "cells": rows, "summary": summary})
    write_text(output_dir / "results.md", f"# {title}\n\n{markdown_summary(summary)}\n")
    return summary


# ----- plots --------------------------------------------------------------------------------------------------------
def plot_positions(summary: Sequence[dict], records: Sequence[dict], path: Path) -> Path:
    """The position x depth accuracy map of the single-placement runs beside the MetaPEFT runs' mean learned gamma."""
    from matplotlib.figure import Figure

    from metapeft.gamma import GammaTable, draw_table

    single = [row for row in summary if not row["meta"]]
    blocks = list(dict.fromkeys(row["block"] for row in single))
    positions = list(dict.fromkeys(row["position"] for row in single))
    accuracy = torch.full((len(blocks), len(positions)), math.nan)
    for row in single:
        accuracy[blocks.index(row["block"]), positions.index(row["position"])] = 100 * row["accuracy_mean"]
    gamma = GammaTable.mean([r["gamma"] for r in records if r["cell"]["point"]["meta"] and r["gamma"]])
    figure = Figure(figsize=(3 + 0.9 * (len(blocks) + len(gamma.layer_labels)), 1.8 + 0.45 * len(positions)))
    left, right = figure.subplots(1, 2)
    seeds = single[0]["seeds"]
    draw_table(left, GammaTable(accuracy, tuple(blocks), tuple(positions)), "test accuracy (%)",
               f"one PEFT module at (block, position): accuracy, {seeds} seed(s)", cmap="magma", annotate=".1f")
    draw_table(right, gamma, "gamma", "MetaPEFT: learned gamma (mean over seeds)", annotate=".2f")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def plot_lines(summary: Sequence[dict], x: str, line: Sequence[str], path: Path, title: str) -> Path:
    """Accuracy (overall solid, the last group dashed, +- std bars) and fine-tuning time against ``x`` (categorical),
    one line per combination of the ``line`` coordinates; rows whose ``x`` is ``-`` (plain PEFT in a meta grid) are
    drawn as horizontal references. Points where any seed diverged carry a red cross."""
    from matplotlib.figure import Figure

    groups = [k[: -len("_mean")] for k in summary[0] if k.endswith("_accuracy_mean")
              and k[: -len("_mean")] not in HEADLINE_METRICS]
    dashed = groups[-1] if groups else None
    figure = Figure(figsize=(11, 3.8))
    accuracy_axes, time_axes = figure.subplots(1, 2)
    varied = [row for row in summary if row[x] != "-"]
    xs = list(dict.fromkeys(str(row[x]) for row in varied))
    lines = list(dict.fromkeys(tuple(row[key] for key in line) for row in varied))
    for value in lines:
        rows = [row for row in varied if tuple(row[key] for key in line) == value]
        where = [xs.index(str(row[x])) for row in rows]
        label = " ".join(str(v) for v in value)
        for metric, style in (("accuracy", "-"), (dashed, "--")):
            if metric is None:
                continue
            accuracy_axes.errorbar(where, [100 * r[f"{metric}_mean"] for r in rows],
                                   yerr=[100 * (r[f"{metric}_std"] or 0) for r in rows], ls=style, marker="o",
                                   capsize=3, label=f"{label} {metric.removesuffix('_accuracy')}".strip())
        time_axes.errorbar(where, [r["seconds_mean"] for r in rows], yerr=[r["seconds_std"] or 0 for r in rows],
                           marker="o", capsize=3, label=label or "MetaPEFT")
        diverged = [(w, r) for w, r in zip(where, rows) if r.get("diverged")]
        if diverged:
            accuracy_axes.scatter([w for w, _ in diverged], [100 * r["accuracy_mean"] for _, r in diverged], s=90,
                                  marker="x", color="red", zorder=5,
                                  label=f"{label}: diverged in " + ", ".join(f"{r['diverged']}/{r['seeds']}"
                                                                              for _, r in diverged))
    for row in summary:
        if row not in varied:
            accuracy_axes.axhline(100 * row["accuracy_mean"], color="gray", lw=1, label="plain PEFT overall")
            time_axes.axhline(row["seconds_mean"], color="gray", lw=1, label="plain PEFT")
    for axes, ylabel in ((accuracy_axes, "test accuracy (%)"), (time_axes, "fine-tuning time (s)")):
        axes.set_xticks(range(len(xs)), xs)
        axes.set(xlabel=x.replace("_", " "), ylabel=ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


# ----- the command --------------------------------------------------------------------------------------------------
def sweep_cells(kind: str, task: Task, values: Sequence | None = None, modes: Sequence[str] | None = None,
                methods: Sequence[str] = ("plain",), positions: Sequence[str] | None = None) -> list[Cell]:
    """The grid points (seed 0) of sweep ``kind`` on ``task``; ``values`` are the swept values (log2 alpha, ratios
    or intervals; defaults ``DEFAULT_*``), ``modes`` the hypergradient modes of ``meta_interval``; ``methods``
    (:data:`METHODS`) and ``positions`` (default: every position of the task, one at a time; :data:`ALL_POSITIONS`
    for all at once) those of ``alpha``."""
    if kind not in KINDS:
        raise ValueError(f"sweep kind must be one of {KINDS}, got {kind!r}")
    from metapeft.trainer.config import META_MODES

    unknown = sorted(set(modes or ()) - set(META_MODES))
    if unknown:
        raise ValueError(f"unknown hypergradient mode(s) {unknown}; known: {list(META_MODES)}")
    chosen = positions
    blocks, positions = task.layout()
    unknown = sorted(set(chosen or ()) - {*positions, ALL_POSITIONS})
    if unknown:
        raise ValueError(f"unknown position(s) {unknown}; the task has {list(positions)} (or {ALL_POSITIONS!r})")
    if kind != "alpha" and (chosen is not None or tuple(methods) != ("plain",)):
        raise ValueError(f"methods and positions choose the alpha sweep's cells, not the {kind} sweep's")
    if kind == "positions":
        if values:
            raise ValueError("the positions sweep takes no values (its grid is every block x position)")
        if not all(b.isdigit() for b in blocks):
            raise ValueError("the position x depth sweep needs a timm ViT placement (blocks x positions), not "
                             f"target_modules rows {blocks[:3]}")
        return position_cells(blocks, positions)
    if kind == "alpha":
        return alpha_cells(positions if chosen is None else chosen, values or DEFAULT_LOG2_ALPHA, methods)
    if kind == "meta_ratio":
        return meta_ratio_cells(values or DEFAULT_RATIOS)
    return meta_interval_cells(values or DEFAULT_INTERVALS, modes)


def run_sweep(kind: str, task: Task, output_dir: str | os.PathLike, seeds: Sequence[int] = (0,), jobs: int = 1,
              values: Sequence | None = None, modes: Sequence[str] | None = None, progress: bool = True,
              methods: Sequence[str] = ("plain",), positions: Sequence[str] | None = None) -> dict:
    """Run sweep ``kind`` (module docstring) on ``task`` into ``output_dir`` (resuming finished cells) and write
    its tables and plot; returns ``{"summary": rows, "table": Markdown, "files": {...}}``."""
    output_dir = Path(output_dir)
    cells = with_seeds(sweep_cells(kind, task, values, modes, methods, positions), seeds)
    records = run_grid(task, cells, output_dir, jobs=jobs, progress=progress)
    title = f"metapeft sweep {kind} ({len(seeds)} seed(s))"
    summary = write_tables(records, output_dir, title)
    plot = output_dir / f"{kind}.png"
    if kind == "positions":
        plot_positions(summary, records, plot)
    elif kind == "alpha":
        plot_lines(summary, "log2_alpha", ("position", "method"), plot, f"{title}: accuracy vs log2(alpha)")
    elif kind == "meta_ratio":
        plot_lines(summary, "meta_ratio", (), plot, f"{title}: MetaPEFT vs meta-set ratio")
    else:
        plot_lines(summary, "meta_interval", ("meta_mode",), plot, f"{title}: MetaPEFT vs meta interval")
    files = {name: str(output_dir / name) for name in ("results.csv", "results.json", "results.md")}
    return {"summary": summary, "table": markdown_summary(summary), "files": {**files, "plot": str(plot)}}
