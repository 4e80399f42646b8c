"""The run config's schema and reference: every key documented, the schema's keys are the ones the loaders accept,
``metapeft config --defaults`` is the defaults (oracle: the dataclasses' own instances) and ``metapeft train``
accepts it as is, docs/config.md is the generated reference."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

import metapeft
import metapeft.runs.builders
from metapeft.cli import main
from metapeft.data.from_config import KEYS as DATA_KEYS
from metapeft.inject import InjectionConfig
from metapeft.runs import config as run_config
from metapeft.trainer import TrainerConfig
from tests.helpers.imagefiles import digit_images

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_has_a_type_and_help_and_the_schema_is_what_the_loaders_accept():
    for name in ("", *run_config.SCHEMA):
        for doc in run_config.section_options(name):
            assert doc.type and len(doc.help) >= 10, (name, doc.name)
    assert list(run_config.MODEL_KEYS) == [d.name for d in run_config.section_options("model")]
    assert {d.name for d in run_config.section_options("data")} == DATA_KEYS
    keywords = [p.name for p in inspect.signature(metapeft.inject).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert [d.name for d in run_config.section_options("peft")] == keywords == list(run_config.PEFT_KEYS)
    trainer_fields = [f.name for f in dataclasses.fields(TrainerConfig)]
    assert [d.name for d in run_config.section_options("train")] == [
        n for n in trainer_fields if n not in run_config.TRAIN_KEYS_SET_BY_RUN]
    assert set(run_config.TRAIN_KEYS_SET_BY_RUN) <= set(trainer_fields)
    assert run_config.TOP_LEVEL_KEYS == (*run_config.SECTIONS, *(d.name for d in run_config.section_options("")))


def plain(value):
    return [plain(v) for v in value] if isinstance(value, tuple | list) else value


def test_defaults_are_the_dataclasses_defaults_with_examples_for_required_keys(capsys):
    assert main(["config", "--defaults"]) == 0
    text = capsys.readouterr().out
    assert text == run_config.defaults_yaml()
    config = yaml.safe_load(text)
    assert set(config) == set(run_config.TOP_LEVEL_KEYS)
    trainer = TrainerConfig().to_dict()
    assert config["train"] == {k: v for k, v in trainer.items() if k not in run_config.TRAIN_KEYS_SET_BY_RUN}
    assert config["peft"] == {f.name: plain(getattr(InjectionConfig(), f.name)) for f in InjectionConfig.options()}
    assert config["model"] == {"name": "vit_base_patch16_224", "pretrained": True, "weights": None,
                               "weights_format": "timm", "kwargs": {}, "seed": 0}
    assert config["data"] == {"kind": "folder", "root": "data", "train": "train", "test": "test", "split": None,
                              "classnames": None, "imbalance": 100, "subset_seed": 0, "image_size": 224,
                              "resize": None}
    assert config["output_dir"] == "runs/run" and config["eval_each_epoch"] is False
    for key in ("  # int: training epochs\n  epochs: 10\n", "# str, required: timm model name"):
        assert key in text
    assert all(len(line) <= 120 for line in text.splitlines())


def write_image_folder(root: Path, per_class: dict[str, int], size: int = 24) -> None:
    images, labels = digit_images(1797, size)
    for split, count in per_class.items():
        for digit in (0, 1):
            folder = root / split / f"digit{digit}"
            folder.mkdir(parents=True)
            for i, image in enumerate([im for im, label in zip(images, labels) if label == digit][:count]):
                image.save(folder / f"{split}_{i}.png")


def test_metapeft_train_accepts_the_defaults_as_is(tmp_path, capsys, monkeypatch):
    """The printed file, unedited, trains: only timm's download of vit_base_patch16_224 is replaced (no network
    here) by a tiny ViT of the same family, and the data sits where the defaults look (./data/train, ./data/test)."""
    assert main(["config", "--defaults"]) == 0
    path = tmp_path / "defaults.yaml"
    path.write_text(capsys.readouterr().out)
    write_image_folder(tmp_path / "data", {"train": 80, "test": 3})  # batch 128 leaves images for the meta set
    create_model = timm.create_model

    def download_free(name, pretrained=False, **kwargs):
        assert name == "vit_base_patch16_224" and pretrained, (name, pretrained)
        return create_model("vit_tiny_patch16_224", pretrained=False, patch_size=32, depth=1, embed_dim=32,
                            num_heads=2, **kwargs)

    monkeypatch.setattr(timm, "create_model", download_free)
    monkeypatch.setattr(metapeft.runs.builders, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only oversubscribe the shared cores
    try:
        assert main(["train", "--config", str(path)]) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "runs" / "run"
    assert json.loads((run / "eval.json").read_text())["accuracy"] >= 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["train"]["epochs"] == 10 and recorded["classes"] == ["digit0", "digit1"]


def test_docs_config_md_is_the_generated_reference(capsys):
    assert main(["config", "--markdown"]) == 0
    generated = capsys.readouterr().out
    assert generated == run_config.reference_markdown()
    for doc in run_config.section_options("train"):
        assert f"| `train.{doc.name}` |" in generated
    assert (ROOT / "docs" / "config.md").read_text() == generated, (
        "docs/config.md is stale: regenerate it with `metapeft config --markdown > docs/config.md`")


def test_config_needs_one_of_its_flags(capsys):
    with pytest.raises(SystemExit):
        main(["config"])
    assert "one of the arguments --defaults --markdown is required" in capsys.readouterr().err
