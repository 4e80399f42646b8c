"""Run directories of the command line (metapeft.runs.directory): a damaged recorded config, a backbone argument typo, a
start that failed before its first checkpoint: each is an error naming the file or key, never a traceback, and a
directory without a checkpoint is reusable."""

from __future__ import annotations

import pytest
import yaml

from metapeft.cli import main
from metapeft.runs.directory import RUN_CONFIG, read_run_config
from tests.helpers.cli import tiny_config
from tests.helpers.imagefiles import tiny_split_dataset
from tests.helpers.threads import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_split_dataset(tmp_path_factory.mktemp("runs_data"))


def write(path, config: dict):
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("content, message", [
    ("", "is empty"), ("[1, 2]", "must hold a yaml mapping, got a list"), ("model: [", "invalid yaml"),
    ("\xff\xfe", None), ("model: {name: x}\n", "no integer num_classes"),
    ("num_classes: 4\ntrain: [1]\n", "section(s) ['train'] not mappings"),
], ids=["empty", "list", "bad-yaml", "binary", "no-classes", "bad-section"])
def test_a_damaged_recorded_config_is_named_by_eval(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content == "\xff\xfe":
        (run / RUN_CONFIG).write_bytes(b"\xff\xfe\x00\x01")
        message = "not UTF-8"
    else:
        (run / RUN_CONFIG).write_text(content)
    with pytest.raises(ValueError, match=f"run config {run / RUN_CONFIG}"):
        read_run_config(run)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run / RUN_CONFIG) in err and message in err and "Traceback" not in err


def test_a_typo_in_model_kwargs_names_the_key(dataset, tmp_path, capsys):
    config = tiny_config(dataset, tmp_path / "run")
    config["model"] = {**config["model"], "kwargs": {**config["model"]["kwargs"], "embed_dimm": 32}}
    assert main(["train", "--config", str(write(tmp_path / "c.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert "model.kwargs" in err and "embed_dimm" in err and not (tmp_path / "run").exists()


def test_an_unknown_train_key_names_the_config_file(dataset, tmp_path, capsys):
    config = tiny_config(dataset, tmp_path / "run", learning_rate=0.1)
    path = write(tmp_path / "c.yaml", config)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"config file {path}: unknown train key(s) ['learning_rate']" in err


def test_a_start_that_failed_before_its_first_checkpoint_leaves_a_reusable_directory(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    failing = write(tmp_path / "c.yaml", tiny_config(dataset, run, epochs=1, head="no_such_head"))
    assert main(["train", "--config", str(failing)]) == 2
    assert "no_such_head" in capsys.readouterr().err and (run / RUN_CONFIG).is_file()
    assert main(["train", "--config", str(failing), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint.pt: the run there stopped before its first checkpoint" in err
    fixed = write(tmp_path / "c.yaml", tiny_config(dataset, run, epochs=1))
    assert main(["train", "--config", str(fixed)]) == 0
    assert (run / "checkpoint.pt").is_file() and "head" not in read_run_config(run)[0]["train"]
    assert main(["train", "--config", str(fixed)]) == 2  # a run that reached a checkpoint is never reused
    assert "is not empty" in capsys.readouterr().err
