"""The ``metapeft`` command line (also ``python -m metapeft``): parses arguments, calls the library, prints.

| command | what it does |
|---|---|
| ``metapeft train --config CFG [--set key=value ...] [--weights PATH] [--resume or --overwrite]`` | fine-tune |
| ``metapeft eval RUN [--data CFG_OR_INDEX] [--split test]`` | the paper's metrics table for a trained run |
| ``metapeft gamma RUN [--plot out.png]`` | the learned gamma table (and heatmap) |
| ``metapeft export RUN --peft DIR`` | a trained LoRA run as an HF PEFT adapter directory (:mod:`metapeft.hf_peft`) |
| ``metapeft config --defaults`` or ``--markdown`` | a complete commented run config at its defaults; the reference |
| ``metapeft info`` | versions, devices, built extensions, backend availability |
| ``metapeft bench [NAME ...] [--quick] [--list]`` | the benchmark scripts of a source checkout |
| ``metapeft demo [--seeds N] [--quick] [--readme README.md]`` | the small-scale demonstration (:mod:`metapeft.demo`) |
| ``metapeft sweep KIND [--config CFG] [--seeds N] [--jobs N]`` | the paper's analyses (:mod:`metapeft.sweep`) |

The run config's schema is :mod:`metapeft.runs.config`; building models and data, :mod:`metapeft.runs.builders`;
run directories, :mod:`metapeft.runs.directory`. Library errors (``ValueError``, ``OSError``) print as
``metapeft COMMAND: error: MESSAGE`` with exit status 2; an interrupted run exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from metapeft.metrics import format_percent, metrics_table
from metapeft.trainer.callbacks import Callback


class EpochSummary(Callback):
    """Prints one line per epoch: mean training loss, time and throughput, gamma range, and the test metrics of
    the per-epoch evaluation when ``fit`` has an ``eval_set`` (``with_eval``; ``groups`` names the class groups to
    show)."""

    def __init__(self, with_eval: bool, groups: Sequence[str] = ()) -> None:
        self.with_eval, self.groups = with_eval, list(groups)
        self._reset()

    def _reset(self) -> None:
        self.start, self.images, self.steps, self.loss_sum, self.line = time.perf_counter(), 0, 0, 0.0, ""

    def on_fit_start(self, trainer) -> None:
        self._reset()

    def on_step_end(self, trainer, record: dict) -> None:
        self.loss_sum = self.loss_sum + record["train_loss"]  # stays on the device until the epoch ends
        self.images += record["batch_size"]
        self.steps += 1

    def on_epoch_end(self, trainer, record: dict) -> None:
        seconds = time.perf_counter() - self.start
        loss = float(self.loss_sum) / max(self.steps, 1)
        gammas = [g for values in record["gammas"].values() for g in values]
        gamma = f" | gamma {min(gammas):.3f}-{max(gammas):.3f}" if gammas else ""
        self.line = (f"epoch {record['epoch']}/{trainer.config.epochs} | loss {loss:.4f} | {seconds:.1f} s "
                     f"({self.images / max(seconds, 1e-9):.0f} img/s){gamma}")
        if not self.with_eval:
            self._print(trainer, "")

    def on_evaluate(self, trainer, record: dict) -> None:
        groups = "".join(f" {g} {format_percent(record.get(f'{g}_accuracy'))}" for g in self.groups)
        self._print(trainer, f" | test acc {format_percent(record.get('accuracy'))} class-mean "
                             f"{format_percent(record.get('class_mean_accuracy'))}{groups}")

    def _print(self, trainer, suffix: str) -> None:
        if trainer.rank == 0:
            tqdm.write(self.line + suffix)
        self._reset()


def fit_until_interrupted(trainer, eval_set=None) -> dict:
    """``trainer.fit(eval_set)``; the first Ctrl-C (SIGINT) asks the trainer to stop at the next step boundary with a
    resumable checkpoint (``fit``'s result then has ``stopped``), a second one aborts at once (KeyboardInterrupt)."""

    def on_sigint(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop()
        tqdm.write("metapeft: interrupt received, stopping after the current step (Ctrl-C again to abort now)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return trainer.fit(eval_set=eval_set)
    finally:
        signal.signal(signal.SIGINT, previous)


# ----- commands ------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from metapeft.runs.config import apply_overrides, load_config, method_name
    from metapeft.runs.directory import finish_run, prepare_run
    from metapeft.trainer import MetaPEFTTrainer, setup_distributed

    rank, world_size = setup_distributed()  # under torchrun: join its process group; (0, 1) otherwise
    say = print if rank == 0 else _silent
    config = apply_overrides(load_config(args.config), args.set or [])
    if args.weights is not None:
        config.setdefault("model", {})["weights"] = str(Path(args.weights).resolve())
    run = prepare_run(config, args.output_dir, args.resume, Path.cwd(), overwrite=args.overwrite)
    with run.claim or contextlib.nullcontext():
        data = run.data
        moved = "" if run.claim is None or run.claim.moved_to is None else \
            f" (the previous run moved to {run.claim.moved_to})"
        say(f"{run.summary}\ntrain {len(data.train)} images, test {len(data.test)} images, "
            f"{data.split.num_classes} classes ({data.split.name}); run directory {run.directory}{moved}"
            + (f"; {world_size} processes" if world_size > 1 else ""))
        summary = EpochSummary(run.eval_each_epoch, data.split.groups)
        trainer = MetaPEFTTrainer(run.model, data.train, config=run.trainer_config, callbacks=[summary],
                                  head_init_set=data.train_eval)
        result = fit_until_interrupted(trainer, data.test if run.eval_each_epoch else None)
        if result["stopped"]:
            say(f"interrupted at step {trainer.global_step}; checkpoint {trainer.files.checkpoint}\n"
                f"resume with: metapeft train --config {args.config} --resume" + _echo_options(args))
            return 130
        say(metrics_table({method_name(config): finish_run(run, trainer)}))
    return 0


def _silent(*args, **kwargs) -> None:
    """``print`` on ranks other than 0 under torchrun: one copy of every message."""


def _echo_options(args: argparse.Namespace) -> str:
    parts = [f" --set {item}" for item in args.set or []]
    if args.weights:
        parts.append(f" --weights {args.weights}")
    if args.output_dir:
        parts.append(f" --output-dir {args.output_dir}")
    return "".join(parts)


def cmd_eval(args: argparse.Namespace) -> int:
    from metapeft.runs.config import method_name
    from metapeft.runs.directory import evaluate_run, load_run

    config, model, _ = load_run(args.run, args.weights)
    metrics = evaluate_run(config, model, args.data, args.split, args.batch_size, args.num_workers)
    print(metrics_table({method_name(config): metrics}))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return 0


def cmd_gamma(args: argparse.Namespace) -> int:
    from metapeft.gamma import gamma_table, plot_gamma
    from metapeft.runs.config import method_name
    from metapeft.runs.directory import load_run

    config, model, _ = load_run(args.run, args.weights)
    table = gamma_table(model)
    print(table)
    if args.plot:
        print(f"heatmap written to {plot_gamma(table, args.plot, title=f'gamma: {method_name(config)}')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from metapeft.hf_peft import export_peft, require_peft
    from metapeft.runs.directory import load_run

    try:
        require_peft()
    except ImportError as error:
        print(f"metapeft export: error: {error}", file=sys.stderr)
        return 2
    _, model, directory = load_run(args.run, args.weights)
    written = export_peft(model, args.peft)
    print(f"HF PEFT adapter of {directory} written to {written}; load it with "
          f"peft.PeftModel.from_pretrained(<the run's backbone>, {written!r})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from metapeft.runs.config import defaults_yaml, reference_markdown

    print(defaults_yaml() if args.defaults else reference_markdown(), end="")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import metapeft
    from metapeft.build_info import build_info, format_build_info, package_versions

    info = build_info()
    packages = package_versions()
    if args.json:
        print(json.dumps({"metapeft": metapeft.__version__, "python": platform.python_version(),
                          "packages": packages, "threads": torch.get_num_threads(), **info}, indent=2))
        return 0
    lines = [f"metapeft {metapeft.__version__} ({Path(metapeft.__file__).parent})",
             f"python {platform.python_version()} on {platform.platform()}",
             "packages: " + ", ".join(f"{name} {version}" for name, version in packages.items()),
             f"CPU threads: {torch.get_num_threads()}", format_build_info(info)]
    print("\n".join(lines))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from metapeft.benchmark_scripts import benchmark_scripts, benchmarks_dir

    folder = benchmarks_dir()
    scripts = benchmark_scripts(folder)
    if args.list:
        width = max(map(len, scripts), default=0)
        print("\n".join(f"{name.ljust(width)}  {script.path.relative_to(folder.parent)}: {script.summary}"
                        for name, script in scripts.items()))
        return 0
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {list(scripts)}")
    status = 0
    for name in args.names or list(scripts):
        command = scripts[name].command(args.quick)
        print(f"== {name}: {' '.join(command)}", flush=True)
        status = status or subprocess.call(command, cwd=folder.parent)
    return status


def cmd_demo(args: argparse.Namespace) -> int:
    from metapeft.demo import DEFAULT_SEEDS, run_demo

    run_demo(quick=args.quick, output_dir=args.output_dir, cache_dir=args.cache_dir, threads=args.threads,
             seed=args.seed, seeds=DEFAULT_SEEDS if args.seeds is None else args.seeds, jobs=args.jobs,
             readme=args.readme)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from metapeft.sweep import ConfigTask, parse_values, run_sweep

    if args.config is not None:
        from metapeft.runs.config import apply_overrides, load_config

        task = ConfigTask(apply_overrides(load_config(args.config), args.set or []), str(Path.cwd()))
    elif args.set:
        raise ValueError("--set changes a config: give it with --config (without one the sweep runs the demo task)")
    else:
        from metapeft.demo import FULL, QUICK, DemoTask

        task = DemoTask(QUICK if args.quick else FULL, args.cache_dir)
    result = run_sweep(args.kind, task, args.output_dir or f"metapeft-sweep/{args.kind}",
                       seeds=range(args.seed, args.seed + args.seeds), jobs=args.jobs,
                       values=parse_values(args.kind, args.values or []), modes=args.modes,
                       methods=args.methods or ("plain",), positions=args.positions)
    print(f"{result['table']}\nwrote {', '.join(result['files'].values())}")
    return 0


# ----- parser --------------------------------------------------------------------------------------------------------
class LazyChoices:
    """argparse ``choices`` read from ``module.attribute`` when first needed (parsing that command, or its help and
    errors), so importing the CLI or running another command does not import the app module that defines them."""

    def __init__(self, module: str, attribute: str) -> None:
        self.module, self.attribute = module, attribute

    def _values(self) -> Sequence[str]:
        return getattr(importlib.import_module(self.module), self.attribute)

    def __contains__(self, value) -> bool:
        return value in self._values()

    def __iter__(self):
        return iter(self._values())


def build_parser() -> argparse.ArgumentParser:
    """The ``metapeft`` argument parser (module docstring)."""
    parser = argparse.ArgumentParser(prog="metapeft", description="MetaPEFT: meta-learned modulators for "
                                     "parameter-efficient fine-tuning on long-tailed data.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="fine-tune a backbone with (Meta)PEFT from a config yaml",
                                description="Fine-tune with the MetaPEFT trainer. Ctrl-C writes a resumable "
                                            "checkpoint; continue with --resume.")
    train.add_argument("--config", required=True, help="training config yaml (see configs/)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=0.02 --set peft.rank=4 (repeatable)")
    train.add_argument("--weights", help="local backbone weights (.safetensors or torch state dict) instead of the "
                                         "timm hub download")
    train.add_argument("--output-dir", help="run directory (default: the config's output_dir)")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint.pt")
    resume.add_argument("--overwrite", action="store_true", help="move an existing run in the run directory aside "
                                                                 "(to a timestamped sibling) and start a new one")
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="metrics table (overall, class-mean, groups, macro-F1) of a run")
    evaluate.add_argument("run", help="run directory written by metapeft train (or a file inside it)")
    evaluate.add_argument("--data", help="a config yaml whose data section to evaluate on, or an index file that "
                                         "replaces the run's --split index")
    evaluate.add_argument("--split", choices=("test", "train"), default="test", help="which split (default test)")
    evaluate.add_argument("--weights", help="backbone weights file, if not the one recorded in the run")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256)
    evaluate.add_argument("--num-workers", type=_non_negative_int, default=0)
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.set_defaults(handler=cmd_eval)

    gamma = commands.add_parser("gamma", help="print the learned gamma table of a run (and plot its heatmap)")
    gamma.add_argument("run", help="run directory written by metapeft train (or a file inside it)")
    gamma.add_argument("--plot", metavar="OUT.png", help="write the gamma heatmap here")
    gamma.add_argument("--weights", help="backbone weights file, if not the one recorded in the run")
    gamma.set_defaults(handler=cmd_gamma)

    export = commands.add_parser("export", help="write a trained LoRA run as an HF PEFT adapter directory",
                                 description="Export a run's LoRA (gamma folded into B) and head as an HF PEFT "
                                             "adapter: peft.PeftModel.from_pretrained(backbone, DIR) reproduces "
                                             "the run's logits. Needs peft (pip install \"metapeft[peft]\") and a "
                                             "linear head (train with --set train.classifier=linear).")
    export.add_argument("run", help="run directory written by metapeft train (or a file inside it)")
    export.add_argument("--peft", required=True, metavar="DIR", help="the HF PEFT adapter directory to write")
    export.add_argument("--weights", help="backbone weights file, if not the one recorded in the run")
    export.set_defaults(handler=cmd_export)

    config = commands.add_parser("config", help="the run config's keys: a complete commented config at its defaults, "
                                                 "or the reference (type, default, meaning of every key)")
    shown = config.add_mutually_exclusive_group(required=True)
    shown.add_argument("--defaults", action="store_true", help="print a complete run config, every key at its default "
                                                               "with a comment; metapeft train accepts it as is")
    shown.add_argument("--markdown", action="store_true", help="print the reference as markdown (docs/config.md)")
    config.set_defaults(handler=cmd_config)

    info = commands.add_parser("info", help="versions, devices, built extensions and backend availability")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(handler=cmd_info)

    bench = commands.add_parser("bench", help="run the benchmark scripts (source checkout)")
    bench.add_argument("names", nargs="*", help="benchmarks to run (default all; see --list)")
    bench.add_argument("--quick", action="store_true", help="tiny smoke-run sizes")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.set_defaults(handler=cmd_bench)

    demo = commands.add_parser("demo", help="small-scale end-to-end demo: LoRA vs LoRA + MetaPEFT on long-tailed, "
                                            "domain-shifted digits (no downloads, CPU, a few minutes)")
    demo.add_argument("--quick", action="store_true", help="a tiny version (seconds; used by the test suite)")
    demo.add_argument("--output-dir", default="metapeft-demo", help="where the plots and results go "
                                                                   "(default ./metapeft-demo)")
    demo.add_argument("--cache-dir", help="where the pre-trained source backbone is cached (default "
                                          "$METAPEFT_CACHE or ~/.cache/metapeft)")
    demo.add_argument("--threads", type=_positive_int, default=1,
                      help="torch CPU threads (default 1: the demo's matrices are too small to gain from more)")
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="the first fine-tuning seed (default 0)")
    demo.add_argument("--seeds", type=_positive_int, help="number of fine-tuning seeds (default: "
                                                          "metapeft.demo.DEFAULT_SEEDS)")
    demo.add_argument("--jobs", type=_positive_int, default=1, help="fine-tuning runs in parallel processes")
    demo.add_argument("--readme", metavar="README.md", help="rewrite this file's demo table from the results")
    demo.set_defaults(handler=cmd_demo)

    sweep = commands.add_parser("sweep", help="the paper's analyses as resumable grids of fine-tuning runs",
                                description="Position x depth map, scaling-factor sweep, meta-set ratio and meta "
                                            "interval sweeps (metapeft.sweep) on a config or on the demo task.")
    sweep.add_argument("kind", metavar="KIND", choices=LazyChoices("metapeft.sweep", "KINDS"),
                       help="what to sweep: %(choices)s")
    sweep.add_argument("--config", help="training config yaml (default: the demo task, offline)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    sweep.add_argument("--values", nargs="+", metavar="V", help="swept values: log2(alpha), meta ratios, or meta "
                                                                "intervals (integers or 'epoch')")
    sweep.add_argument("--modes", nargs="+", metavar="MODE", help="hypergradient modes of the meta_interval sweep")
    sweep.add_argument("--methods", nargs="+", metavar="METHOD", help="alpha sweep: plain and/or meta (MetaPEFT "
                                                                       "with the run's meta schedule), side by side "
                                                                       "(default plain)")
    sweep.add_argument("--positions", nargs="+", metavar="POSITION", help="alpha sweep: the positions, one at a time "
                                                                           "(default every position), or 'all' for "
                                                                           "all at once")
    sweep.add_argument("--seed", type=_non_negative_int, default=0, help="the first seed (default 0)")
    sweep.add_argument("--seeds", type=_positive_int, default=1, help="seeds per grid point (default 1)")
    sweep.add_argument("--jobs", type=_positive_int, default=1, help="runs in parallel processes (default 1)")
    sweep.add_argument("--output-dir", help="where the runs, tables and plot go (default metapeft-sweep/KIND)")
    sweep.add_argument("--quick", action="store_true", help="the demo task at its tiny size")
    sweep.add_argument("--cache-dir", help="the demo task's backbone cache (default $METAPEFT_CACHE or "
                                           "~/.cache/metapeft)")
    sweep.set_defaults(handler=cmd_sweep)
    return parser


def _int_at_least(minimum: int):
    """An argparse ``type`` accepting integers >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metapeft`` command; returns the exit status (0 ok, 1 training diverged, 2 usage
    error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:
        print(f"metapeft {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # the trainer's NonFiniteError: training diverged, no usage error
        print(f"metapeft {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("metapeft: interrupted", file=sys.stderr)
        return 130
