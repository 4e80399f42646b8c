"""The ``metapeft`` command line (also ``python -m metapeft``).

| command | what it does |
|---|---|
| ``metapeft train --config CFG [--set key=value ...] [--weights PATH] [--resume]`` | fine-tune with the trainer |
| ``metapeft eval RUN [--data CFG_OR_INDEX] [--split test]`` | the paper's metrics table for a trained run |
| ``metapeft gamma RUN [--plot out.png]`` | the learned gamma table (and heatmap) |
| ``metapeft info`` | versions, devices, built extensions, backend availability |
| ``metapeft bench [NAME ...] [--quick]`` | the benchmark scripts of a source checkout |
| ``metapeft demo [--quick]`` | the small-scale end-to-end demonstration (:mod:`metapeft.demo`) |

A training config is a yaml mapping with sections ``model`` (timm backbone), ``peft`` (:func:`metapeft.inject`
arguments), ``data`` (:func:`metapeft.data.build_datasets`), ``train`` (:class:`metapeft.TrainerConfig` fields) and
the keys ``output_dir`` and ``eval_each_epoch``. A run directory holds ``config.yaml`` (the resolved config),
the trainer's ``checkpoint.pt`` / ``metrics.jsonl`` / ``model.safetensors``, ``adapter.safetensors``
(:func:`metapeft.save_adapter`) and ``eval.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

SECTIONS = ("model", "peft", "data", "train")
TOP_LEVEL_KEYS = (*SECTIONS, "output_dir", "eval_each_epoch")
MODEL_KEYS = ("name", "pretrained", "weights", "kwargs", "seed")
PEFT_KEYS = ("method", "positions", "layers", "rank", "alpha", "dropout", "meta", "init_gamma", "constraint",
             "activation", "backend")
RUN_CONFIG = "config.yaml"
GROUP_ORDER = ("many", "medium", "few", "head", "tail")
HUB_HOST = ("huggingface.co", 443)


class CLIError(Exception):
    """A user error the CLI reports as ``metapeft: error: <message>`` with exit status 2."""


# ----- configs ------------------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike) -> dict:
    """Read a training config yaml (module docstring); unknown top-level keys and non-mapping sections are errors."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise CLIError(f"{where}: invalid yaml: {getattr(error, 'problem', error)}") from None
    if not isinstance(config, dict):
        raise CLIError(f"{path}: a config must be a yaml mapping with sections {SECTIONS}")
    check_config(config, str(path))
    return config


def check_config(config: dict, source: str) -> None:
    """Reject unknown top-level keys and sections that are not mappings, naming ``source``."""
    unknown = sorted(set(config) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise CLIError(f"{source}: unknown top-level key(s) {unknown}; known: {list(TOP_LEVEL_KEYS)}")
    for section in SECTIONS:
        if not isinstance(config.get(section, {}), dict):
            raise CLIError(f"{source}: section {section!r} must be a mapping, got {config[section]!r}")


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``config`` with each ``dotted.key=value`` applied; values parse as yaml (``3``, ``true``, ``[1, 2]``,
    ``null``); the key's first part must be a known top-level key."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise CLIError(f"--set expects key=value with a dotted key (e.g. train.lr=0.02), got {item!r}")
        if parts[0] not in TOP_LEVEL_KEYS:
            raise CLIError(f"--set {item!r}: unknown top-level key {parts[0]!r}; known: {list(TOP_LEVEL_KEYS)}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise CLIError(f"--set {item!r}: the value is not valid yaml") from None
        node = config
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CLIError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    check_config(config, "--set")
    return config


def _checked_section(config: dict, section: str, allowed: Sequence[str]) -> dict:
    values = dict(config.get(section) or {})
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise CLIError(f"unknown {section} key(s) {unknown}; known: {list(allowed)}")
    return values


def trainer_config(config: dict, output_dir: str | None, resume: bool):
    """The :class:`metapeft.TrainerConfig` of a config's ``train`` section (errors name the bad key)."""
    import dataclasses

    from metapeft.trainer import TrainerConfig

    values = dict(config.get("train") or {})
    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CLIError(f"unknown train key(s) {unknown}; known: {sorted(known)}")
    values.update(output_dir=output_dir, resume=resume)
    try:
        return TrainerConfig(**values)
    except (TypeError, ValueError) as error:
        raise CLIError(f"train section: {error}") from None


# ----- backbone ------------------------------------------------------------------------------------------------------
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (where timm's pretrained weights live) answers a TCP connection."""
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (loaded with ``weights_only=True``;
    a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any read failure is reported with the file's name
        raise CLIError(f"--weights {path}: cannot read weights ({type(error).__name__}: {error})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"--weights {path}: expected a state dict of tensors")
    return state


def build_backbone(model_config: dict, num_classes: int) -> nn.Module:
    """A timm model with ``num_classes`` outputs and pre-trained weights from, in order: ``model.weights`` (a local
    file; the classifier head's tensors are skipped when their shapes differ), timm's hub download when
    ``model.pretrained`` is true and the hub is reachable (or ``HF_HUB_OFFLINE`` is set: timm's local cache).
    ``pretrained: false`` without weights starts from a random initialisation. A clear error says which source is
    missing."""
    import timm

    values = _checked_section({"model": model_config}, "model", MODEL_KEYS)
    name = values.get("name")
    if not name:
        raise CLIError("model.name is required (a timm model name, e.g. vit_base_patch16_224)")
    kwargs = dict(values.get("kwargs") or {})
    weights, pretrained = values.get("weights"), bool(values.get("pretrained", True))
    download = weights is None and pretrained
    if download and not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
        raise CLIError(f"no pre-trained weights for {name!r}: the Hugging Face hub ({HUB_HOST[0]}) is not reachable "
                       "for timm's download and no local file was given; pass --weights PATH (a .safetensors or "
                       "torch state dict of the backbone) or set model.pretrained=false to start from random weights")
    try:
        model = timm.create_model(name, pretrained=download, num_classes=num_classes, **kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise CLIError(f"model.name {name!r} is not a timm model ({error})") from None
        if not download:
            raise
        raise CLIError(f"timm could not load pre-trained weights for {name!r} ({error}); pass --weights PATH") from None
    except OSError as error:  # network and hub-cache failures of the download
        if not download:
            raise
        raise CLIError(f"timm could not download pre-trained weights for {name!r} ({type(error).__name__}: "
                       f"{error}); pass --weights PATH") from None
    if weights is not None:
        state = load_weights_file(weights)
        own = model.state_dict()
        head_prefix = _head_prefix(model)
        mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
        state = {k: v for k, v in state.items() if k not in mismatched}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
        wrong_shape = [f"{k} {tuple(own[k].shape)}" for k in mismatched if not k.startswith(head_prefix)]
        if missing or result.unexpected_keys or wrong_shape:
            raise CLIError(f"--weights {weights} does not fit {name!r}: missing {missing[:5]}, unexpected "
                           f"{result.unexpected_keys[:5]}, other shape than the model's {wrong_shape[:5]}")
    return model


def _head_prefix(model: nn.Module) -> str:
    from metapeft.heads import find_head

    return find_head(model) + "."


def build_model(config: dict, num_classes: int) -> tuple[nn.Module, object]:
    """Backbone (:func:`build_backbone`) with :func:`metapeft.inject` applied from the ``peft`` section, random
    initialisations (backbone without weights, PEFT weights) drawn from ``model.seed`` (default 0) without touching
    the global RNG; returns ``(model, InjectionSummary)``."""
    from metapeft.inject import inject

    peft = _checked_section(config, "peft", PEFT_KEYS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int((config.get("model") or {}).get("seed", 0)))
        model = build_backbone(config.get("model") or {}, num_classes)
        try:
            summary = inject(model, **peft)
        except (TypeError, ValueError) as error:
            raise CLIError(f"peft section: {error}") from None
    return model, summary


def build_data(config: dict, base_dir: str | os.PathLike):
    """:func:`metapeft.data.build_datasets` of the ``data`` section, normalised with the mean / std of the ``model``
    section's timm backbone."""
    from metapeft.data import backbone_normalization, build_datasets

    mean, std = backbone_normalization((config.get("model") or {}).get("name"))
    try:
        return build_datasets(dict(config.get("data") or {}), mean, std, base_dir)
    except (ValueError, FileNotFoundError) as error:
        raise CLIError(str(error)) from None


# ----- tables --------------------------------------------------------------------------------------------------------
def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def metrics_table(rows: dict[str, dict]) -> str:
    """The paper-style table: one row per named metrics dict (:mod:`metapeft.metrics`), columns overall,
    class-mean, each group present (many / medium / few or head / tail), macro-F1; percentages."""
    groups = [g for g in GROUP_ORDER if any(f"{g}_accuracy" in m for m in rows.values())]
    groups += sorted({k[:-9] for m in rows.values() for k, v in m.items()
                      if k.endswith("_accuracy") and (v is None or isinstance(v, float))} - {"class_mean", *groups})
    header = ["method", "overall", "class-mean", *groups, "macro-F1"]
    body = [[name, _percent(m.get("accuracy")), _percent(m.get("class_mean_accuracy")),
             *(_percent(m.get(f"{g}_accuracy")) for g in groups), _percent(m.get("macro_f1"))]
            for name, m in rows.items()]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) \
            + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


# ----- training with Ctrl-C checkpoints and epoch summaries ---------------------------------------------------------
class _InterruptibleBatches:
    """Iterates a DataLoader, raising ``KeyboardInterrupt`` before fetching the next batch once ``flag`` is set:
    the step before has fully finished, so the checkpoint written then resumes exactly."""

    def __init__(self, loader, flag: dict) -> None:
        self.loader, self.flag = loader, flag

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            if self.flag["stop"]:
                raise KeyboardInterrupt
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch


def make_cli_trainer(model, train_set, config, eval_groups: dict | None = None, with_eval: bool = False):
    """A :class:`metapeft.MetaPEFTTrainer` that stops at the next batch boundary on Ctrl-C (``stop_flag``) and prints
    a one-line summary per epoch (mean logged loss, throughput, gamma range; the test metrics when ``with_eval``,
    i.e. when ``fit`` gets an ``eval_set``)."""
    from metapeft.trainer import MetaPEFTTrainer

    class CLITrainer(MetaPEFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.stop_flag = {"stop": False}
            self._epoch_losses, self._epoch_start, self._epoch_steps = [], time.perf_counter(), 0

        def _loader(self, dataset, batch_indices, purpose_step):
            self._epoch_start, self._epoch_steps = time.perf_counter(), len(batch_indices)
            return _InterruptibleBatches(super()._loader(dataset, batch_indices, purpose_step), self.stop_flag)

        def log(self, record: dict) -> None:
            super().log(record)
            if record["event"] == "step":
                self._epoch_losses.append(record["train_loss"])
            elif record["event"] == "epoch":
                self._summary = self._epoch_line(record)
                if not with_eval:
                    self._print_summary("")
            elif record["event"] == "eval":
                self._print_summary(f" | test acc {_percent(record.get('accuracy'))} class-mean "
                                    f"{_percent(record.get('class_mean_accuracy'))}" + "".join(
                                        f" {g} {_percent(record.get(f'{g}_accuracy'))}" for g in eval_groups or ()))

        def _epoch_line(self, record: dict) -> str:
            seconds = time.perf_counter() - self._epoch_start
            images = self._epoch_steps * self.config.batch_size
            loss = sum(self._epoch_losses) / len(self._epoch_losses) if self._epoch_losses else math.nan
            gammas = [g for values in record["gammas"].values() for g in values]
            gamma = f" | gamma {min(gammas):.3f}-{max(gammas):.3f}" if gammas else ""
            self._epoch_losses = []
            return (f"epoch {record['epoch']}/{self.config.epochs} | loss {loss:.4f} | {seconds:.1f} s "
                    f"({images / max(seconds, 1e-9):.0f} img/s){gamma}")

        def _print_summary(self, suffix: str) -> None:
            if self.rank == 0:
                tqdm.write(self._summary + suffix)

    return CLITrainer(model, train_set, config=config)


def fit_with_interrupt(trainer, eval_set=None) -> dict:
    """``trainer.fit(eval_set)``; the first Ctrl-C (SIGINT) stops at the next batch boundary and writes a resumable
    checkpoint (then ``KeyboardInterrupt`` propagates), a second one aborts at once."""

    def on_sigint(signum, frame):
        if trainer.stop_flag["stop"]:
            raise KeyboardInterrupt
        trainer.stop_flag["stop"] = True
        tqdm.write("metapeft: interrupt received, stopping after the current step (Ctrl-C again to abort now)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return trainer.fit(eval_set=eval_set)
    except KeyboardInterrupt:
        if trainer.stop_flag["stop"]:
            trainer.save_state()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


# ----- commands ------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from metapeft.io import save_adapter

    config = apply_overrides(load_config(args.config), args.set or [])
    if args.weights is not None:
        config.setdefault("model", {})["weights"] = str(Path(args.weights).resolve())
    output_dir = args.output_dir or config.get("output_dir")
    if not output_dir:
        raise CLIError("no output directory: set output_dir in the config or pass --output-dir")
    output_dir = Path(output_dir)
    base_dir = Path.cwd()
    _absolutise_data_paths(config, base_dir)
    if args.resume:
        _check_resumable(output_dir, config)
    data = build_data(config, base_dir)
    model, summary = build_model(config, data.split.num_classes)
    train_config = trainer_config(config, str(output_dir), args.resume)
    train_config.class_split = train_config.class_split or data.split.groups
    model_config = config.get("model") or {}
    if model_config.get("weights") is None and not model_config.get("pretrained", True):
        # A random backbone is not reproducible from a file: keep every tensor in the run's weights.
        train_config.save_full_model = True
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**config, "output_dir": str(output_dir), "num_classes": data.split.num_classes,
                "classes": list(data.split.classes), "class_split": data.split.groups}
    (output_dir / RUN_CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    print(f"{summary}\ntrain {len(data.train)} images, test {len(data.test)} images, "
          f"{data.split.num_classes} classes ({data.split.name}); run directory {output_dir}")
    eval_each_epoch = bool(config.get("eval_each_epoch"))
    trainer = make_cli_trainer(model, data.train, train_config, data.split.groups, eval_each_epoch)
    try:
        fit_with_interrupt(trainer, data.test if eval_each_epoch else None)
    except KeyboardInterrupt:
        if not trainer.stop_flag["stop"]:
            raise
        print(f"interrupted at step {trainer.global_step}; checkpoint {output_dir / 'checkpoint.pt'}\n"
              f"resume with: metapeft train --config {args.config} --resume" + _echo_options(args))
        return 130
    save_adapter(trainer.model, output_dir / "adapter.safetensors")
    metrics = trainer.evaluate(data.test)
    (output_dir / "eval.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    print(metrics_table({_method_name(config): metrics}))
    return 0


def _echo_options(args: argparse.Namespace) -> str:
    parts = [f" --set {item}" for item in args.set or []]
    if args.weights:
        parts.append(f" --weights {args.weights}")
    if args.output_dir:
        parts.append(f" --output-dir {args.output_dir}")
    return "".join(parts)


def _absolutise_data_paths(config: dict, base_dir: Path) -> None:
    """Store a config's relative data paths (relative to the working directory, or for ``eval --data`` to that
    config's folder) as absolute paths in the run."""
    data = config.get("data") or {}
    if data.get("root") is not None:
        data["root"] = str((base_dir / os.path.expanduser(str(data["root"]))).resolve())
    split = data.get("split")
    if isinstance(split, str) and split.endswith((".yaml", ".yml")):
        data["split"] = str((base_dir / os.path.expanduser(split)).resolve())


def _check_resumable(output_dir: Path, config: dict) -> None:
    stored_path = output_dir / RUN_CONFIG
    if not (output_dir / "checkpoint.pt").is_file() or not stored_path.is_file():
        raise CLIError(f"--resume: no checkpoint.pt and {RUN_CONFIG} in {output_dir} to resume from")
    stored = yaml.safe_load(stored_path.read_text(encoding="utf-8"))
    changed = [key for key in ("model", "peft", "data", "train") if (stored.get(key) or {}) != (config.get(key) or {})]
    if changed:
        raise CLIError(f"--resume: the config's {changed} section(s) differ from the run's {stored_path}; "
                       "resume with the same config and --set options")


def _method_name(config: dict) -> str:
    peft = config.get("peft") or {}
    method = {"lora": "LoRA", "adaptformer": "AdaptFormer", "adapter": "Adapter"}.get(peft.get("method", "lora"))
    meta = peft.get("meta", True) and (config.get("train") or {}).get("meta", True)
    return f"{method} + MetaPEFT" if meta else f"{method}"


def load_run(run: str | os.PathLike, weights: str | None = None) -> tuple[dict, nn.Module, Path]:
    """Rebuild a trained model from a run directory (or a file in one): the run's config, backbone (``weights``
    overrides the recorded weights file), injection, classifier head and trained tensors (``model.safetensors``,
    else the ``checkpoint.pt`` model state). Returns ``(config, model in eval mode, run directory)``."""
    from metapeft.checkpoint import load_checkpoint
    from metapeft.heads import CosineClassifier, find_head, head_in_features, replace_head

    run = Path(run)
    directory = run if run.is_dir() else run.parent
    if not (directory / RUN_CONFIG).is_file():
        raise CLIError(f"{run} is not a metapeft run: {directory / RUN_CONFIG} is missing (written by metapeft train)")
    config = yaml.safe_load((directory / RUN_CONFIG).read_text(encoding="utf-8"))
    if weights is not None:
        config.setdefault("model", {})["weights"] = str(Path(weights).resolve())
    model, _ = build_model({k: config.get(k) for k in SECTIONS}, config["num_classes"])
    train = trainer_config({"train": config.get("train")}, None, False)
    head_name = find_head(model, train.head)
    if train.classifier == "cosine":
        old = model.get_submodule(head_name)
        replace_head(model, head_name, CosineClassifier(head_in_features(model, old), config["num_classes"],
                                                        train.cosine_scale))
    from_checkpoint = run.is_file() and run.suffix == ".pt"
    if from_checkpoint or not (directory / "model.safetensors").is_file():
        checkpoint = run if from_checkpoint else directory / "checkpoint.pt"
        if not checkpoint.is_file():
            raise CLIError(f"{directory} holds neither model.safetensors nor checkpoint.pt")
        state = load_checkpoint(checkpoint)["model"]
    else:
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise CLIError(f"the trained tensors of {directory} do not fit the rebuilt model: {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    return config, model.eval(), directory


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, num_classes: int, class_split: dict, batch_size: int = 256,
                   num_workers: int = 0) -> dict:
    """Metrics (:func:`metapeft.metrics.metrics_from_confusion`) of ``model``'s argmax predictions on ``dataset``."""
    from torch.utils.data import DataLoader

    from metapeft.metrics import confusion_matrix, metrics_from_confusion

    device = next(model.parameters()).device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    for x, y in tqdm(loader, desc="eval", leave=False):
        predictions = model(x.to(device)).argmax(-1).cpu()
        cm += confusion_matrix(predictions, y, num_classes)
    return metrics_from_confusion(cm, class_split)


def cmd_eval(args: argparse.Namespace) -> int:
    config, model, directory = load_run(args.run, args.weights)
    data_config = dict(config.get("data") or {})
    if args.data is not None:
        data_path = Path(args.data)
        if not data_path.is_file():
            raise CLIError(f"--data {data_path}: no such file (give a config yaml with a data section, or an index "
                           "file listing 'relative/path label' lines under the run's data root)")
        if data_path.suffix in (".yaml", ".yml"):
            loaded = yaml.safe_load(data_path.read_text(encoding="utf-8")) or {}
            data_config = dict(loaded.get("data", loaded))
            _absolutise_data_paths({"data": data_config}, data_path.resolve().parent)
        else:
            data_config[args.split] = str(data_path.resolve())
    data = build_data({"model": config.get("model"), "data": data_config}, ".")
    dataset = data.test
    if args.split == "train":
        dataset = data.train
        dataset.transform = data.test.transform  # evaluate without training augmentation
    split = config.get("class_split") or data.split.groups
    metrics = evaluate_model(model, dataset, config["num_classes"], split, args.batch_size, args.num_workers)
    print(metrics_table({_method_name(config): metrics}))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return 0


def cmd_gamma(args: argparse.Namespace) -> int:
    from metapeft.gamma import gamma_table, plot_gamma

    config, model, _ = load_run(args.run, args.weights)
    table = gamma_table(model)
    print(table)
    if args.plot:
        print(f"heatmap written to {plot_gamma(table, args.plot, title=f'gamma: {_method_name(config)}')}")
    return 0


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - any lookup failure means "not installed"
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import metapeft
    from metapeft.build_info import build_info, format_build_info

    info = build_info()
    packages = {name: _version(name) for name in ("torch", "triton", "timm", "torchvision", "safetensors")}
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


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout metapeft runs from; a clear error for an installed wheel."""
    import metapeft

    folder = Path(metapeft.__file__).resolve().parent.parent / "benchmarks"
    if not folder.is_dir():
        raise CLIError(f"no benchmarks/ folder next to the metapeft package ({folder}); the benchmark suites live in "
                       "the source repository: run `metapeft bench` from a checkout installed with pip install -e .")
    return folder


def cmd_bench(args: argparse.Namespace) -> int:
    folder = benchmarks_dir()
    scripts = {p.stem.removeprefix("bench_"): p for p in sorted(folder.glob("bench_*.py"))}
    if args.list:
        print("\n".join(f"{name}: {path}" for name, path in scripts.items()))
        return 0
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        raise CLIError(f"unknown benchmark(s) {unknown}; available: {list(scripts)}")
    status = 0
    for name in args.names or list(scripts):
        command = [sys.executable, str(scripts[name])] + (["--quick"] if args.quick else [])
        print(f"== {name}: {' '.join(command)}", flush=True)
        status = status or subprocess.call(command, cwd=folder.parent)
    return status


def cmd_demo(args: argparse.Namespace) -> int:
    from metapeft.demo import run_demo

    run_demo(quick=args.quick, output_dir=args.output_dir, cache_dir=args.cache_dir, threads=args.threads,
             seed=args.seed)
    return 0


# ----- parser --------------------------------------------------------------------------------------------------------
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
    train.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint.pt")
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
    demo.add_argument("--seed", type=_non_negative_int, default=0)
    demo.set_defaults(handler=cmd_demo)
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
    """Entry point of the ``metapeft`` command; returns the exit status (0 ok, 2 usage error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CLIError as error:
        print(f"metapeft {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metapeft: interrupted", file=sys.stderr)
        return 130
