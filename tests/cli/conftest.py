"""Shared CLI test setup: one thread per test (tiny models; oversubscribed cores slow them down tenfold), a tiny
on-disk index dataset of digit PNGs and a tiny-ViT training config for it."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.helpers.cli import tiny_config
from tests.helpers.imagefiles import write_index_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """4 classes, long-tailed training split (20/10/5/3 images), balanced test split (4 each), 16x16 PNGs."""
    return write_index_dataset(tmp_path_factory.mktemp("tiny_data"), {"train": [20, 10, 5, 3], "test": [4] * 4})


@pytest.fixture
def write_config(tiny_dataset, tmp_path):
    """``write_config(name, eval_each_epoch, **train) -> path``: a yaml config for the tiny dataset, run in
    ``tmp_path/run``."""
    (tiny_dataset / "split.yaml").write_text("classes: [zero, one, two, three]\nhead: [zero, one]\n"
                                             "tail: [two, three]\n")

    def write(name="config.yaml", eval_each_epoch=False, **train):
        path = tmp_path / name
        config = tiny_config(tiny_dataset, tmp_path / "run", **train)
        path.write_text(yaml.safe_dump({**config, "eval_each_epoch": eval_each_epoch}))
        return path

    return write
