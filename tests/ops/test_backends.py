"""Dispatch: "auto" on CUDA tensors prefers the backend a recorded GPU check chose; elsewhere nothing changes."""

import json

import pytest
import torch

from metapeft.ops import backends


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """``recorded(name)`` writes a GPU-check choice where dispatch reads it; caches are reset around the test."""
    path = tmp_path / "gpu_default.json"
    monkeypatch.setattr(backends, "GPU_DEFAULT_FILE", path)
    backends.refresh_backends()

    def write(name):
        path.write_text(json.dumps({"cuda_default_backend": name, "git_sha": "abc1234"}))
        backends.refresh_backends()
        return path

    yield write
    backends.refresh_backends()


def test_without_a_recorded_check_auto_keeps_the_built_in_order(recorded):
    assert backends.recorded_cuda_default_backend() is None
    assert backends.auto_order("cuda") == backends.BACKEND_NAMES
    recorded(None)
    assert backends.auto_order("cuda") == backends.BACKEND_NAMES


@pytest.mark.parametrize("name", ["cuda", "triton", "torch"])
def test_a_recorded_choice_goes_first_on_cuda_only(recorded, name):
    recorded(name)
    order = backends.auto_order("cuda")
    assert order[0] == name and sorted(order) == sorted(backends.BACKEND_NAMES)
    assert backends.auto_order("cpu") == backends.BACKEND_NAMES
    assert backends.select_backend("auto", torch.randn(3, 8)) == "torch"


def test_a_recorded_name_that_is_no_backend_is_an_error_naming_the_file(recorded):
    path = recorded("tensorrt")
    with pytest.raises(ValueError, match=f"{path}.*cuda_default_backend.*'tensorrt'"):
        backends.auto_order("cuda")

