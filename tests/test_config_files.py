"""Loading run config files (metapeft.runs.config.load_config, read_yaml_mapping): every unreadable, malformed or
misspelled file is a ValueError naming the file (and the line or key), never a traceback from yaml or the
dataclass."""

from __future__ import annotations

import pytest

from metapeft.runs.config import load_config, read_yaml_mapping


@pytest.mark.parametrize("content, message", [
    (b"train: [", r":1: invalid yaml"), (b"- 1\n- 2\n", "must hold a yaml mapping, got a list"),
    (b"\xff\xfe\x00\x01", r"not a yaml text file \(not UTF-8\)"), (b"trian: {}\n", r"unknown top-level key\(s\)"),
    (b"train: {lr2: 0.1}\n", r"unknown train key\(s\) \['lr2'\]"), (b"train: {epochs: 0}\n", "epochs must be"),
    (b"model: {kwarg: {}}\n", r"unknown model key\(s\) \['kwarg'\]"),
    (b"peft: {rnak: 2}\n", r"unknown peft key\(s\) \['rnak'\]"),
], ids=["yaml", "list", "binary", "top-level", "train-key", "train-value", "model-key", "peft-key"])
def test_config_file_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"config file {path}.*{message}"):
        load_config(path)


def test_an_empty_config_is_empty_unless_a_mapping_is_required(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("")
    assert load_config(path) == {}
    with pytest.raises(ValueError, match=f"run config {path} is empty"):
        read_yaml_mapping(path, "run config", empty_ok=False)
    with pytest.raises(FileNotFoundError, match=f"run config {tmp_path / 'absent.yaml'} does not exist"):
        read_yaml_mapping(tmp_path / "absent.yaml", "run config")
