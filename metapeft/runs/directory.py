"""Run directories of the ``metapeft`` command line: preparing a fine-tuning run from a run config, finishing it, and
rebuilding a trained model from its directory.

A run directory holds one run (:mod:`metapeft.runs.lock`: a lock while it trains, a new run never overwrites an
old one) and ``config.yaml`` (the resolved run config plus ``num_classes``, ``classes`` and
``class_split``), the trainer's files (``checkpoint.pt``, ``metrics.jsonl``, ``model.safetensors``;
:mod:`metapeft.trainer.output_dir`), ``adapter.safetensors`` (:func:`metapeft.save_adapter`) and ``eval.json``
(the final test metrics).

Errors are ``ValueError`` (:class:`~metapeft.atomic_files.LoadError` for files that cannot be loaded) / ``OSError``
(``FileNotFoundError``, :class:`~metapeft.runs.lock.RunDirectoryError`) whose message names the file or the key.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from metapeft.data import DataBundle
from metapeft.inject import InjectionSummary
from metapeft.runs.builders import build_data, build_model
from metapeft.runs.config import SECTIONS, read_yaml_mapping, resolve_data_paths, trainer_config
from metapeft.runs.lock import RunClaim, claim_run_directory
from metapeft.trainer import MetaPEFTTrainer, TrainerConfig
from metapeft.trainer.distributed import rank_and_world_size
from metapeft.trainer.evaluation import evaluate_model
from metapeft.trainer.model_setup import install_head
from metapeft.trainer.output_dir import CHECKPOINT_NAME, LOG_NAME, WEIGHTS_NAME

RUN_CONFIG, ADAPTER_NAME, EVAL_NAME = "config.yaml", "adapter.safetensors", "eval.json"
# What a run that failed before its first checkpoint leaves: a new run reuses a directory holding only these.
BEFORE_FIRST_CHECKPOINT = (RUN_CONFIG, LOG_NAME)


@dataclass
class PreparedRun:
    """Everything a fine-tuning run needs, built from its run config by :func:`prepare_run`, and the claim on its
    directory."""

    config: dict
    directory: Path
    data: DataBundle
    model: nn.Module
    summary: InjectionSummary
    trainer_config: TrainerConfig
    claim: RunClaim | None

    @property
    def eval_each_epoch(self) -> bool:
        """Whether ``fit`` evaluates on the test split after every epoch."""
        return bool(self.config.get("eval_each_epoch"))


def check_resumable(directory: Path, config: dict) -> None:
    """Refuse to resume unless ``directory`` holds a checkpoint and a readable ``config.yaml`` (the error says
    which is missing) whose sections equal ``config``'s."""
    stored_path = directory / RUN_CONFIG
    missing = [name for name in (CHECKPOINT_NAME, RUN_CONFIG) if not (directory / name).is_file()]
    if missing == [CHECKPOINT_NAME]:
        raise FileNotFoundError(f"resume: {directory} holds no {CHECKPOINT_NAME}: the run there stopped before its "
                                "first checkpoint; start it again as a new run (its directory is reused)")
    if missing:
        raise FileNotFoundError(f"resume: no {' and no '.join(missing)} in {directory} to resume from")
    stored = read_run_config(directory)[0]
    changed = [key for key in SECTIONS if (stored.get(key) or {}) != (config.get(key) or {})]
    if changed:
        raise ValueError(f"resume: the config's {changed} section(s) differ from the run's {stored_path}; "
                         "resume with the same config")


def prepare_run(config: dict, output_dir: str | os.PathLike | None, resume: bool = False,
                base_dir: str | os.PathLike = ".", overwrite: bool = False) -> PreparedRun:
    """Claim ``output_dir`` (default: the config's ``output_dir``) for the run, build the data, the PEFT model and
    the trainer config of a run config (relative data paths resolve against ``base_dir``) and record the resolved
    config in ``output_dir/config.yaml``. A new run refuses a non-empty directory; ``resume`` checks it holds a
    checkpoint of the same config, ``overwrite`` moves the old run aside first. The returned run holds the claim
    (:attr:`PreparedRun.claim`; rank 0 claims, the other ranks of a torchrun get None); release it when the run
    ends."""
    config = copy.deepcopy(config)
    output_dir = output_dir or config.get("output_dir")
    if not output_dir:
        raise ValueError("no output directory: set output_dir in the config or the output_dir argument")
    directory = Path(output_dir)
    resolve_data_paths(config, base_dir)
    claim = claim_run_directory(directory, resume=resume, overwrite=overwrite, disposable=BEFORE_FIRST_CHECKPOINT) \
        if rank_and_world_size()[0] == 0 else None
    try:
        return _prepare_claimed(config, directory, resume, overwrite, base_dir, claim)
    except BaseException:
        if claim is not None:
            claim.release()
        raise


def _prepare_claimed(config: dict, directory: Path, resume: bool, overwrite: bool, base_dir,
                     claim: RunClaim | None) -> PreparedRun:
    if resume:
        check_resumable(directory, config)
    data = build_data(config, base_dir)
    model, summary = build_run_model(config, data.split.num_classes)
    train = trainer_config(config, str(directory), resume, overwrite)
    train.class_split = train.class_split or data.split.groups
    train.num_classes = data.split.num_classes
    model_config = config.get("model") or {}
    if model_config.get("weights") is None and not model_config.get("pretrained", True):
        # A random backbone is not reproducible from a file: keep every tensor in the run's weights.
        train.save_full_model = True
    resolved = {**config, "output_dir": str(directory), "num_classes": data.split.num_classes,
                "classes": list(data.split.classes), "class_split": data.split.groups}
    if claim is not None:
        (directory / RUN_CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    return PreparedRun(resolved, directory, data, model, summary, train, claim)


def build_run_model(config: dict, num_classes: int):
    """:func:`metapeft.runs.builders.build_model`, with a ``model.kwargs`` entry the backbone does not take named in a
    ``ValueError`` (timm raises a bare ``TypeError``)."""
    kwargs = (config.get("model") or {}).get("kwargs") or {}
    try:
        return build_model(config, num_classes)
    except TypeError as error:
        if not kwargs:
            raise
        raise ValueError(f"model.kwargs {sorted(kwargs)}: the backbone {config['model'].get('name')!r} does not "
                         f"take them ({error})") from None


def finish_run(run: PreparedRun, trainer: MetaPEFTTrainer) -> dict:
    """After a completed ``fit``: write ``adapter.safetensors`` and the test metrics ``eval.json``; returns them. Under
    torchrun every rank evaluates its shard and rank 0 writes."""
    from metapeft.adapter_files import save_adapter

    metrics = trainer.evaluate(run.data.test)
    with trainer.full_model():  # FSDP2: every rank gathers the model, rank 0 writes it
        if trainer.rank == 0:
            save_adapter(trainer.model, run.directory / ADAPTER_NAME, class_names=run.config["classes"])
            (run.directory / EVAL_NAME).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def read_run_config(run: str | os.PathLike) -> tuple[dict, Path]:
    """The recorded config of a run directory (or of the directory holding the file ``run``) and the directory.
    Errors name the file: missing, unreadable, empty or not a mapping, without ``num_classes`` or with a section
    that is not a mapping."""
    run = Path(run)
    directory = run if run.is_dir() else run.parent
    path = directory / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a metapeft run: {path} is missing (written by metapeft train)")
    config = read_yaml_mapping(path, "run config", empty_ok=False)
    bad = [name for name in SECTIONS if not isinstance(config.get(name) or {}, dict)]
    if bad or not isinstance(config.get("num_classes"), int):
        what = f"section(s) {bad} not mappings" if bad else "no integer num_classes"
        raise ValueError(f"run config {path} is damaged ({what}); it is written by metapeft train")
    return config, directory


def load_run(run: str | os.PathLike, weights: str | os.PathLike | None = None) -> tuple[dict, nn.Module, Path]:
    """Rebuild a trained model from a run directory (or a file in one): the run's config, backbone (``weights``
    overrides the recorded weights file), injection, classifier head and trained tensors (``model.safetensors``,
    else the ``checkpoint.pt`` model state; ``run`` may name a checkpoint file). Returns ``(config, model in eval
    mode, run directory)``.

    Strict: the file is verified (checksum, finiteness) and must hold every PEFT weight, modulator and head tensor
    of the rebuilt model, and nothing the model lacks, with the model's shapes and dtypes
    (:class:`~metapeft.atomic_files.LoadError` naming the file and every problem otherwise)."""
    from metapeft.adapter_files import adapter_tensors
    from metapeft.atomic_files import check_tensors_fit, copy_into, load_checkpoint, load_safetensors

    config, directory = read_run_config(run)
    run = Path(run)
    if weights is not None:
        config.setdefault("model", {})["weights"] = str(Path(weights).resolve())
    model, _ = build_run_model({k: config.get(k) for k in SECTIONS}, config["num_classes"])
    install_head(model, trainer_config({"train": config.get("train")}), config["num_classes"])
    from_checkpoint = run.is_file() and run.suffix == ".pt"
    if from_checkpoint or not (directory / WEIGHTS_NAME).is_file():
        checkpoint = run if from_checkpoint else directory / CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{directory} holds neither {WEIGHTS_NAME} nor {CHECKPOINT_NAME}")
        source, state = checkpoint, load_checkpoint(checkpoint)["model"]
    else:
        source, (state, _) = directory / WEIGHTS_NAME, load_safetensors(directory / WEIGHTS_NAME)
    current = model.state_dict()
    check_tensors_fit(state, current, f"{source}", required=set(adapter_tensors(model)))
    copy_into(current, state)
    return config, model.eval(), directory


def eval_data(config: dict, data: str | os.PathLike | None = None, split: str = "test"):
    """The dataset and class split to evaluate a run (``config``: its recorded config) on: the run's ``split``
    (``"test"`` or ``"train"``, the latter through the test transform, without augmentation), with ``data`` either
    a config yaml whose ``data`` section replaces the run's, or an index file that replaces the run's ``split``
    index. Returns ``(dataset, class split)``."""
    data_config = dict(config.get("data") or {})
    if data is not None:
        data_path = Path(data)
        if not data_path.is_file():
            raise FileNotFoundError(f"data {data_path}: no such file (give a config yaml with a data section, or "
                                    "an index file listing 'relative/path label' lines under the run's data root)")
        if data_path.suffix in (".yaml", ".yml"):
            loaded = read_yaml_mapping(data_path, "data")
            data_config = dict(loaded.get("data", loaded))
            resolve_data_paths({"data": data_config}, data_path.resolve().parent)
        else:
            data_config[split] = str(data_path.resolve())
    bundle = build_data({"model": config.get("model"), "data": data_config}, ".")
    dataset = bundle.train_eval if split == "train" else bundle.test
    return dataset, config.get("class_split") or bundle.split.groups


def evaluate_run(config: dict, model: nn.Module, data: str | os.PathLike | None = None, split: str = "test",
                 batch_size: int = 256, num_workers: int = 0, progress: bool = True) -> dict:
    """Metrics of a rebuilt run (:func:`load_run`) on :func:`eval_data`'s dataset."""
    dataset, class_split = eval_data(config, data, split)
    return evaluate_model(model, dataset, config["num_classes"], class_split, batch_size, num_workers, progress)
