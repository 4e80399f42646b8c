"""The CLI's argument handling and error messages (library errors -> exit status 2); the run config and builders;
the shipped configs; info and bench."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import metapeft
import metapeft.runs.builders
from metapeft.cli import main
from metapeft.runs.builders import build_backbone, build_model
from metapeft.runs.config import load_config, trainer_config
from tests.helpers.cli import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_no_command_or_unknown_command_is_a_usage_error(capsys):
    for argv in ([], ["fly"], ["train"], ["demo", "--threads", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: --config" in err
    assert "invalid choice: 'fly'" in err and "expected a positive integer, got '0'" in err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "eval", "gamma", "info", "bench", "demo"):
        assert command in out


@pytest.mark.parametrize("overrides, message", [
    (["novalue"], "--set expects key=value"),
    (["colour=1"], "unknown top-level key 'colour'"),
    (["train.lrr=0.1"], r"unknown train key(s) ['lrr']"),
    (["train.lr=-1"], "train section: lr must be > 0"),
    (["peft.rnak=2"], r"unknown peft key(s) ['rnak']"),
    (["peft.method=prefix"], "peft section: method must be one of"),
    (["data.root=/does/not/exist"], "is not a directory"),
    (["data.kind=lmdb"], "data.kind must be one of"),
    (["model.name=not_a_model_at_all"], "is not a timm model"),
    (["train.lr=[1"], "the value is not valid yaml"),
], ids=["no-equals", "top-level", "train-key", "train-value", "peft-key", "peft-method", "data-root", "data-kind",
        "model-name", "bad-yaml"])
def test_train_config_errors_are_clear(write_config, capsys, overrides, message):
    config = write_config()
    argv = ["train", "--config", str(config)] + [x for item in overrides for x in ("--set", item)]
    code, _, err = run(argv, capsys)
    assert code == 2 and err.startswith("metapeft train: error:") and message in err, err


def test_config_file_errors(tmp_path, capsys):
    code, _, err = run(["train", "--config", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and "config file" in err and "does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: x\n peft: 1\n")
    code, _, err = run(["train", "--config", str(bad)], capsys)
    assert code == 2 and f"{bad}:3: invalid yaml" in err
    bad.write_text("model: [1, 2]\n")
    code, _, err = run(["train", "--config", str(bad)], capsys)
    assert code == 2 and "section 'model' must be a mapping" in err
    bad.write_text("model: {name: x}\noutput_dir: null\n")
    code, _, err = run(["train", "--config", str(bad)], capsys)
    assert code == 2 and "no output directory" in err


def test_missing_pretrained_weights_names_both_sources(write_config, capsys, monkeypatch):
    monkeypatch.setattr(metapeft.runs.builders, "hub_reachable", lambda timeout=3.0: False)
    code, _, err = run(["train", "--config", str(write_config()), "--set", "model.pretrained=true"], capsys)
    assert code == 2 and "Hugging Face hub" in err and "set model.weights to a local file" in err
    assert "model.pretrained=false" in err
    code, _, err = run(["train", "--config", str(write_config()), "--weights", "/nope/w.safetensors"], capsys)
    assert code == 2 and "model.weights /nope/w.safetensors: no such file" in err


def test_weights_file_loads_the_backbone_and_skips_a_different_head(tmp_path):
    source = timm.create_model(TINY_MODEL["name"], pretrained=False, num_classes=10, **TINY_MODEL["kwargs"])
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    for path in ("w.safetensors", "w.pth"):
        model = build_backbone({**TINY_MODEL, "weights": str(tmp_path / path)}, num_classes=4)
        own = model.state_dict()
        for key, value in source.state_dict().items():
            if key.startswith("head."):
                assert own[key].shape[0] == 4
            else:
                assert torch.equal(own[key], value), key
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone({**TINY_MODEL, "weights": str(tmp_path / "wrong.safetensors")}, num_classes=4)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth: not a readable checkpoint"):
        build_backbone({**TINY_MODEL, "weights": str(tmp_path / "junk.pth")}, num_classes=4)
    torch.save({"state_dict": source.state_dict(), "rng": random.Random(0)}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match=r"code.pth: refused: .*random\.Random") as error:
        build_backbone({**TINY_MODEL, "weights": str(tmp_path / "code.pth")}, num_classes=4)
    assert "weights_only" not in str(error.value)


def test_model_build_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    first, _ = build_model({"model": TINY_MODEL, "peft": {"rank": 2}}, 4)
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = build_model({"model": TINY_MODEL, "peft": {"rank": 2}}, 4)
    other, _ = build_model({"model": {**TINY_MODEL, "seed": 1}, "peft": {"rank": 2}}, 4)
    key = "blocks.0.attn.qkv.lora_A"
    assert torch.equal(first.state_dict()[key], second.state_dict()[key])
    assert not torch.equal(first.state_dict()[key], other.state_dict()[key])


def test_resume_needs_a_checkpoint_and_the_same_config(write_config, tmp_path, capsys):
    config = write_config()
    code, _, err = run(["train", "--config", str(config), "--resume"], capsys)
    assert code == 2 and "resume: no checkpoint.pt" in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    stored = yaml.safe_load(config.read_text())
    recorded = {**stored, "train": {**stored["train"], "lr": 1}, "num_classes": 4}  # as metapeft train records it
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(recorded))
    code, _, err = run(["train", "--config", str(config), "--resume"], capsys)
    assert code == 2 and "the config's ['train'] section(s) differ" in err


def test_eval_and_gamma_need_a_run_directory(tmp_path, capsys):
    for command in ("eval", "gamma"):
        code, _, err = run([command, str(tmp_path)], capsys)
        assert code == 2 and f"{tmp_path} is not a metapeft run" in err


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    name = path.stem
    dataset, method, mode = name.split("_")
    positions = config["peft"].get("positions")
    if method == "loraqv":  # the authors' LoRA: q and v only
        assert positions == ["q", "v"]
        method = "lora"
    assert config["peft"]["method"] == method and config["peft"]["meta"] == (mode == "meta")
    train = trainer_config(config, "runs/x", False)
    assert (train.lr, train.momentum, train.weight_decay, train.batch_size, train.epochs) == (0.01, 0.9, 5e-4, 128, 10)
    assert (train.loss, train.tau, train.classifier, train.cosine_scale, train.meta) == \
        ("logit_adjusted", 1.0, "cosine", 25.0, mode == "meta")
    assert config["data"]["kind"] == ("cifar100_lt" if dataset == "cifar100lt" else "index")
    small = {"name": "vit_tiny_patch16_224", "pretrained": False,
             "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}}
    peft = {**config["peft"], "rank": min(config["peft"]["rank"], 8)}  # the tiny model is 64 wide
    model, summary = build_model({**config, "model": small, "peft": peft}, 5)
    linears = {"qkv" if p in ("q", "k", "v") else p for p in positions or ()}  # q, k, v share timm's qkv Linear
    expected_modules = {"lora": 2 * len(linears), "adaptformer": 2, "adapter": 2 * len(positions or ())}[method]
    assert len(summary.modules) == expected_modules
    assert summary.meta_parameters == (len(summary.placements) if mode == "meta" else 0)


def test_info_reports_versions_devices_and_backends(capsys):
    code, out, _ = run(["info"], capsys)
    assert code == 0 and f"torch {torch.__version__.split('+')[0]}" in out and "timm " in out
    assert "backends:" in out and "  torch   available" in out and "extension metapeft._C:" in out
    assert ("devices: none" in out) != torch.cuda.is_available()
    code, out, _ = run(["info", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["backends"]["torch"] is None and report["packages"]["timm"] == timm.__version__


def benchmark_modules() -> dict[str, str]:
    """Oracle: the runnable modules of benchmarks/ (a ``__main__`` block or pytest tests; the harness and the
    contenders have neither), with their docstrings' first lines."""
    sources = {p: p.read_text() for p in (REPO / "benchmarks").glob("*.py")}
    return {str(p.relative_to(REPO)): ast.get_docstring(ast.parse(text)).splitlines()[0]
            for p, text in sources.items() if 'if __name__ == "__main__":' in text or "\ndef test_" in text}


def test_bench_lists_every_benchmark_with_its_summary_and_rejects_unknown_names(capsys):
    code, out, _ = run(["bench", "--list"], capsys)
    expected = benchmark_modules()
    listed = {line.split()[1].rstrip(":"): line.split(": ", 1)[1] for line in out.splitlines()}
    assert code == 0 and listed == expected
    assert "scaled_lora_cpu" in [line.split()[0] for line in out.splitlines()]  # the headline CPU benchmark
    code, _, err = run(["bench", "no_such_bench"], capsys)
    assert code == 2 and "unknown benchmark(s) ['no_such_bench']" in err and "vit_step_cpu" in err


def test_bench_from_an_installed_package_says_it_needs_a_source_checkout(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site-packages" / "metapeft"
    site.mkdir(parents=True)
    monkeypatch.setattr(metapeft, "__file__", str(site / "__init__.py"))
    code, _, err = run(["bench", "--list"], capsys)
    assert code == 2 and "source checkout" in err and str(site) in err and "pip install" in err


@pytest.mark.parametrize("error, status", [(ValueError("bad value x"), 2), (FileNotFoundError("no file y"), 2),
                                           (KeyboardInterrupt(), 130)], ids=["value", "file", "interrupt"])
def test_library_errors_map_to_exit_status_and_one_line(monkeypatch, capsys, error, status):
    def load_run(run, weights=None):
        raise error

    monkeypatch.setattr("metapeft.runs.directory.load_run", load_run)
    code, out, err = run(["gamma", "some/run"], capsys)
    assert code == status and out == ""
    message = "metapeft: interrupted\n" if status == 130 else f"metapeft gamma: error: {error}\n"
    assert err == message


def test_a_bug_is_not_disguised_as_a_usage_error(monkeypatch):
    def load_run(run, weights=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr("metapeft.runs.directory.load_run", load_run)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["gamma", "some/run"])


def test_the_cli_imports_demo_and_sweep_only_for_their_commands(capsys):
    import subprocess
    import sys

    probe = ("import sys, metapeft.cli as cli; cli.build_parser().parse_args(['info']); "
             "print(sorted(m for m in ('metapeft.demo', 'metapeft.sweep') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stderr
    with pytest.raises(SystemExit):  # the choices still come from metapeft.sweep.KINDS
        main(["sweep", "bogus"])
    assert "invalid choice: 'bogus' (choose from 'positions', 'alpha', 'meta_ratio'" in capsys.readouterr().err
