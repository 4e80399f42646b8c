"""Shared test setup: every test is seeded; ``gpu`` tests skip cleanly without CUDA;
``interpreter`` tests run only under ``TRITON_INTERPRET=1`` (the child process of ``run_interpreter_suite``)."""

import os
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    skip_interpreter = pytest.mark.skip(reason="runs in the TRITON_INTERPRET=1 child of its module's "
                                        "test_interpreter_suite")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not interpreting:
            item.add_marker(skip_interpreter)
