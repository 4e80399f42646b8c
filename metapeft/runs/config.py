"""The run config: a yaml mapping that describes one fine-tuning run, its schema, loading, ``--set`` overrides and the
mapping to :class:`metapeft.TrainerConfig`.

| key | what | schema |
|---|---|---|
| ``model`` | the backbone (:func:`metapeft.runs.builders.build_backbone`) | :class:`ModelSection` |
| ``peft`` | what :func:`metapeft.inject` places | :class:`metapeft.inject.InjectionConfig` |
| ``data`` | :func:`metapeft.data.build_datasets` arguments | :class:`DataSection` |
| ``train`` | the trainer's knobs (less :data:`TRAIN_KEYS_SET_BY_RUN`) | :class:`metapeft.TrainerConfig` |
| ``output_dir``, ``eval_each_epoch`` | the run directory, eval per epoch | :class:`RunSettings` |

Every key's type, default and meaning come from these dataclasses' field help (:mod:`metapeft.schema`):
:func:`reference_markdown` renders them as docs/config.md, :func:`defaults_yaml` as a complete commented config
(``metapeft config --markdown`` / ``--defaults``).

Every error is a ``ValueError`` (``FileNotFoundError`` for a missing file) whose message names the key or the file.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from metapeft.inject import InjectionConfig
from metapeft.schema import OptionDoc, option, option_docs
from metapeft.trainer import TrainerConfig


@dataclass(frozen=True)
class ModelSection:
    """The ``model:`` section: which timm backbone and where its weights come from."""

    name: str = option(help="timm model name, e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k (the authors' DOTA "
                            "backbone); for a quick try vit_tiny_patch16_224 with small kwargs and pretrained: false",
                       example="vit_base_patch16_224")
    pretrained: bool = option(True, "start from timm's pre-trained weights (downloaded from the Hugging Face hub, or "
                                    "timm's cache under HF_HUB_OFFLINE=1); false without weights: a random backbone")
    weights: str | None = option(None, "a local weights file of the backbone (.safetensors or a torch state dict) "
                                       "instead of the download; --weights PATH sets it")
    weights_format: str = option("timm", "key layout of the weights file: timm, or satmae (SatMAE's pre-training "
                                         "checkpoint, e.g. fmow_pretrain.pth)")
    kwargs: dict = option({}, "extra keyword arguments of timm.create_model, e.g. {img_size: 32, patch_size: 8, "
                              "depth: 4, embed_dim: 64, num_heads: 4}")
    seed: int = option(0, "seed of the random initialisations (a backbone without weights, the PEFT weights)")


@dataclass(frozen=True)
class DataSection:
    """The ``data:`` section (:func:`metapeft.data.build_datasets`); relative paths resolve against the directory
    ``metapeft train`` runs in."""

    kind: str = option(help="index (the authors' index files), folder (ImageFolder trees: root/train/<class>/*.png "
                            "and root/test/<class>/*.png) or cifar100_lt (a local CIFAR-100 python copy)",
                       example="folder")
    root: str = option(help="the dataset's root folder", example="data")
    train: str = option(help="index: the training index file (lines 'path label', paths relative to root); folder: "
                             "the training sub-folder of root (not used by cifar100_lt)", example="train")
    test: str = option(help="index: the test index file; folder: the test sub-folder of root (not used by "
                            "cifar100_lt)", example="test")
    split: str | None = option(None, "class groups for the metrics: a built-in (dota, fusrs_v2.5, fusrs_v1.7) or a "
                                     "split yaml (ours or the authors' lt_split_config.yaml); null: from the training "
                                     "counts (many > 100, medium 20-100, few < 20 images)")
    classnames: str | None = option(None, "classnames.txt (line i names label i); null: beside the split yaml, then "
                                          "root/classnames.txt, else the labels or folder names")
    imbalance: float = option(100, "cifar100_lt: the imbalance factor (largest / smallest class)")
    subset_seed: int = option(0, "cifar100_lt: which images the long-tailed subset keeps")
    image_size: int = option(224, "input size: training random-resized crop, test centre crop")
    resize: int | None = option(None, "test-time resize of the short side before the centre crop; null: "
                                      "image_size * 256 / 224")


@dataclass(frozen=True)
class RunSettings:
    """The top-level keys besides the sections."""

    output_dir: str = option(help="the run directory: config.yaml, checkpoint.pt, metrics.jsonl, model.safetensors, "
                                  "adapter.safetensors, eval.json (--output-dir DIR overrides it)", example="runs/run")
    eval_each_epoch: bool = option(False, "evaluate on the test split after every epoch")


# Train fields the run sets itself: output_dir (top-level output_dir / --output-dir), resume and overwrite
# (--resume / --overwrite), num_classes (the data's class count).
TRAIN_KEYS_SET_BY_RUN = ("output_dir", "resume", "overwrite", "num_classes")
SCHEMA = {"model": ModelSection, "peft": InjectionConfig, "data": DataSection, "train": TrainerConfig}
SECTION_TITLES = {"model": "model: the backbone", "peft": "peft: what is injected (metapeft.inject's keywords)",
                  "data": "data: the datasets", "train": "train: the trainer (metapeft.TrainerConfig's fields)"}
SECTIONS = tuple(SCHEMA)
TOP_LEVEL_KEYS = (*SECTIONS, *(spec.name for spec in dataclasses.fields(RunSettings)))
MODEL_KEYS = tuple(spec.name for spec in dataclasses.fields(ModelSection))
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


# ----- the configuration reference -----------------------------------------------------------------------------------
def section_options(name: str) -> list[OptionDoc]:
    """The documented keys of section ``name`` (``""``: the top-level keys) in declaration order."""
    if name == "":
        return option_docs(RunSettings)
    if name == "peft":
        return option_docs(InjectionConfig)
    return option_docs(SCHEMA[name], exclude=TRAIN_KEYS_SET_BY_RUN if name == "train" else ())


def _plain(value):
    """``value`` with tuples as lists (yaml.safe_dump writes no tuples)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _yaml_value(value) -> str:
    """One value as inline yaml (``null``, ``true``, ``0.01``, ``[q, v]``, ``{}``)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 20).strip()
    return text.removesuffix("...").strip()


def defaults_yaml() -> str:
    """A complete run config: every key at its default, each under a comment with its type and meaning; a required
    key holds its example value. ``metapeft train`` accepts it as is when the example backbone, data folders and
    run directory exist (``metapeft config --defaults``)."""
    lines = ["# A complete metapeft run config: every key at its default, with its type and meaning (reference: "
             "docs/config.md).",
             "# Keys marked 'required' hold an example: point them at your backbone, data and run directory. "
             "Delete any other key",
             "# to keep its default. Run: metapeft train --config THIS_FILE [--set section.key=value ...]", ""]

    def entry(doc: OptionDoc, indent: str) -> None:
        comment = f"{doc.type}{', required' if doc.required else ''}: {doc.help}"
        lines.extend(textwrap.wrap(comment, 120, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   "))
        lines.append(f"{indent}{doc.name}: {_yaml_value(doc.example if doc.required else doc.default)}")

    for doc in section_options(""):
        entry(doc, "")
    for name in SCHEMA:
        lines.extend(["", f"# {SECTION_TITLES[name]}"])
        if name == "train":
            lines.append(f"# (set by the run, not here: {', '.join(TRAIN_KEYS_SET_BY_RUN)})")
        lines.append(f"{name}:")
        for doc in section_options(name):
            entry(doc, "  ")
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """docs/config.md: every key of the run yaml and of ``TrainerConfig`` with its type, default and meaning
    (``metapeft config --markdown``)."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    def table(docs: list[OptionDoc], prefix: str) -> list[str]:
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        rows += [f"| `{prefix}{d.name}` | `{cell(d.type)}` | "
                 + ("required" + (f" (e.g. `{_yaml_value(d.example)}`)" if d.example is not None else "")
                    if d.required else f"`{_yaml_value(d.default)}`") + f" | {cell(d.help)} |" for d in docs]
        return rows

    out = ["# Configuration reference", "",
           "<!-- generated by `metapeft config --markdown > docs/config.md` from the schema in metapeft/runs/config.py "
           "(field help of ModelSection, InjectionConfig, DataSection, TrainerConfig, RunSettings); do not edit -->",
           "",
           "A run config is a yaml file with four sections and two top-level keys; `metapeft train --config FILE` "
           "reads it, `--set section.key=value` overrides any key. `metapeft config --defaults` prints a complete "
           "config with every key at its default. Types are Python annotations (`X | None`: the key may be `null`); "
           "a list in yaml stands for a tuple.", "",
           "## Top-level keys", "", *table(section_options(""), ""), ""]
    for name in SCHEMA:
        out += [f"## `{name}:` {SECTION_TITLES[name].removeprefix(name + ': ')}", ""]
        if name == "train":
            out += ["The same fields are `metapeft.TrainerConfig`'s keywords in Python. Set by the run, not in the "
                    "yaml: " + ", ".join(f"`{k}`" for k in TRAIN_KEYS_SET_BY_RUN) + " (the top-level `output_dir` "
                    "or `--output-dir`, `--resume`, `--overwrite`, the data's class count); in Python they are "
                    "keywords like the others.", ""]
        out += [*table(section_options(name), f"{name}."), ""]
    if any(not d.help for name in ("", *SCHEMA) for d in section_options(name)):
        missing = [f"{name or 'top-level'}.{d.name}" for name in ("", *SCHEMA) for d in section_options(name)
                   if not d.help]
        out += ["Keys without help text yet: " + ", ".join(missing), ""]
    return "\n".join(out)
