"""The run config: a yaml mapping that describes one fine-tuning run, its schema, loading, ``--set`` overrides and the
mapping to :class:`metapeft.TrainerConfig`.

| key | what |
|---|---|
| ``model`` | the backbone (keys :data:`MODEL_KEYS`; :func:`metapeft.build.build_backbone`) |
| ``peft`` | :func:`metapeft.inject` arguments (keys :data:`PEFT_KEYS`) |
| ``data`` | :func:`metapeft.data.build_datasets` arguments |
| ``train`` | :class:`metapeft.TrainerConfig` fields |
| ``output_dir`` | the run directory (:mod:`metapeft.runs`) |
| ``eval_each_epoch`` | evaluate on the test split after every epoch |

Every error is a ``ValueError`` (``FileNotFoundError`` for a missing file) whose message names the key or the file.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from metapeft.inject import InjectionConfig
from metapeft.trainer import TrainerConfig

SECTIONS = ("model", "peft", "data", "train")
TOP_LEVEL_KEYS = (*SECTIONS, "output_dir", "eval_each_epoch")
MODEL_KEYS = ("name", "pretrained", "weights", "weights_format", "kwargs", "seed")
PEFT_KEYS = tuple(spec.name for spec in InjectionConfig.options())  # the peft: section is an InjectionConfig
METHOD_NAMES = {"lora": "LoRA", "adaptformer": "AdaptFormer", "adapter": "Adapter"}


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file", empty_ok: bool = True) -> dict:
    """The mapping a yaml file holds (``{}`` for an empty file when ``empty_ok``). Errors name ``what`` and the file:
    ``FileNotFoundError`` when it is missing, ``ValueError`` when it is unreadable, not UTF-8 text, invalid yaml (with
    the line), empty (unless ``empty_ok``) or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path}: not a yaml text file (not UTF-8)") from None
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{what} {where}: invalid yaml: {getattr(error, 'problem', error)}") from None
    if loaded is None and empty_ok:
        return {}
    if loaded is None:
        raise ValueError(f"{what} {path} is empty")
    if not isinstance(loaded, dict):
        raise ValueError(f"{what} {path} must hold a yaml mapping, got a {type(loaded).__name__}")
    return loaded


def load_config(path: str | os.PathLike) -> dict:
    """Read a run config yaml (module docstring); unknown keys (top level, ``model``, ``peft``, ``train``),
    non-mapping sections and invalid ``train`` values are errors naming the file."""
    config = read_yaml_mapping(path)
    check_config(config, f"config file {path}")
    return config


def check_config(config: dict, source: str) -> None:
    """Reject unknown top-level keys, sections that are not mappings, unknown ``model`` / ``peft`` / ``train`` keys
    and invalid ``train`` values, naming ``source`` (a file or ``--set``)."""
    unknown = sorted(set(config) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {unknown}; known: {list(TOP_LEVEL_KEYS)}")
    for name in SECTIONS:
        if not isinstance(config.get(name, {}), dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {config[name]!r}")
    try:
        section(config, "model", MODEL_KEYS)
        section(config, "peft", PEFT_KEYS)
        trainer_config(config)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``config`` with each ``dotted.key=value`` applied; values parse as yaml (``3``, ``true``, ``[1, 2]``,
    ``null``); the key's first part must be a known top-level key."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"--set expects key=value with a dotted key (e.g. train.lr=0.02), got {item!r}")
        if parts[0] not in TOP_LEVEL_KEYS:
            raise ValueError(f"--set {item!r}: unknown top-level key {parts[0]!r}; known: {list(TOP_LEVEL_KEYS)}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"--set {item!r}: the value is not valid yaml") from None
        node = config
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    check_config(config, "--set")
    return config


def section(config: dict, name: str, allowed: Sequence[str]) -> dict:
    """A copy of ``config[name]`` (empty when absent); keys outside ``allowed`` are an error naming them."""
    values = dict(config.get(name) or {})
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {name} key(s) {unknown}; known: {list(allowed)}")
    return values


def trainer_config(config: dict, output_dir: str | None = None, resume: bool = False,
                   overwrite: bool = False) -> TrainerConfig:
    """The :class:`metapeft.TrainerConfig` of a config's ``train`` section with ``output_dir``, ``resume`` and
    ``overwrite`` (errors name the bad key)."""
    known = [f.name for f in dataclasses.fields(TrainerConfig)]
    values = section(config, "train", known)
    values.update(output_dir=output_dir, resume=resume, overwrite=overwrite)
    try:
        return TrainerConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"train section: {error}") from None


def resolve_data_paths(config: dict, base_dir: str | os.PathLike) -> None:
    """Make the ``data`` section's relative ``root``, ``classnames`` and yaml ``split`` paths absolute against
    ``base_dir``, in place (a run directory then names its data independently of the working directory)."""
    base_dir = Path(base_dir)
    data = config.get("data") or {}
    for key in ("root", "classnames"):
        if data.get(key) is not None:
            data[key] = str((base_dir / os.path.expanduser(str(data[key]))).resolve())
    split = data.get("split")
    if isinstance(split, str) and split.endswith((".yaml", ".yml")):
        data["split"] = str((base_dir / os.path.expanduser(split)).resolve())


def method_name(config: dict) -> str:
    """The method's display name for tables: ``"LoRA"``, ``"AdaptFormer + MetaPEFT"``, ..."""
    peft = config.get("peft") or {}
    method = METHOD_NAMES.get(peft.get("method", "lora"), str(peft.get("method")))
    meta = peft.get("meta", True) and (config.get("train") or {}).get("meta", True)
    return f"{method} + MetaPEFT" if meta else method
