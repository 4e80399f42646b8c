"""Shared CLI test setup: one thread per test (tiny models; oversubscribed cores slow them down tenfold), a tiny
on-disk index dataset of digit PNGs and a tiny-ViT training config for it."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.data.imagefiles import write_index_dataset

TINY_MODEL = {"name": "vit_tiny_patch16_224", "pretrained": False,
              "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}


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


def tiny_config(dataset, output_dir, **train):
    """A training config dict for ``tiny_dataset`` (LoRA rank 2 + MetaPEFT, 2 epochs of batch 8)."""
    return {
        "model": TINY_MODEL,
        "peft": {"method": "lora", "rank": 2},
        "data": {"kind": "index", "root": str(dataset), "train": "train.txt", "test": "test.txt",
                 "split": str(dataset / "split.yaml"), "image_size": 16, "resize": 18},
        "train": {"epochs": 2, "batch_size": 8, "log_every": 1, "progress": False, "lr": 0.05, "meta_lr": 0.05,
                  **train},
        "output_dir": str(output_dir),
    }


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
