"""A fixture for modules of tiny-model tests: one torch thread per test (oversubscribed cores slow them down
tenfold). Import it into a test module or conftest to use it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run the test with one torch thread, restoring the previous count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
