"""Shared CLI test setup: one thread per test (tiny models; oversubscribed cores slow them down tenfold), a tiny
on-disk index dataset of digit PNGs and a tiny-ViT training config for it."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers.cli import tiny_config
from tests.helpers.imagefiles import tiny_split_dataset
from tests.helpers.threads import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """:func:`tests.helpers.imagefiles.tiny_split_dataset` once per session."""
    return tiny_split_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture
def write_config(tiny_dataset, tmp_path):
    """``write_config(name, eval_each_epoch, **train) -> path``: a yaml config for the tiny dataset, run in
    ``tmp_path/run``."""

    def write(name="config.yaml", eval_each_epoch=False, **train):
        path = tmp_path / name
        config = tiny_config(tiny_dataset, tmp_path / "run", **train)
        path.write_text(yaml.safe_dump({**config, "eval_each_epoch": eval_each_epoch}))
        return path

    return write
