"""``metapeft sweep`` from the command line: on a training config and on the demo task, resumable, with its tables
and plot."""

from __future__ import annotations

import json

from metapeft.cli import main

PNG = b"\x89PNG"


def test_sweep_on_a_config_resumes(write_config, tmp_path, capsys):
    config, out = write_config(), tmp_path / "sweep"
    assert main(["sweep", "meta_interval", "--config", str(config), "--values", "1", "epoch", "--modes",
                 "first_order", "--output-dir", str(out), "--set", "train.epochs=1"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert [(row["meta_mode"], row["meta_interval"]) for row in summary] == [("-", "-"), ("first_order", 1),
                                                                            ("first_order", "epoch")]
    assert "| meta | meta_mode | meta_interval | seeds |" in printed and str(out / "meta_interval.png") in printed
    assert (out / "meta_interval.png").read_bytes()[:4] == PNG
    for name in ("plain", "first_order_every_1", "first_order_every_epoch"):
        record = json.loads((out / name / "seed_0" / "result.json").read_text())
        assert record["metrics"]["num_samples"] == 16 and ("tail_accuracy" in record["metrics"])
        assert (record["gamma"] is None) == (name == "plain")
    stamp = (out / "plain" / "seed_0" / "result.json").stat().st_mtime_ns
    assert main(["sweep", "meta_interval", "--config", str(config), "--values", "1", "epoch", "--modes",
                 "first_order", "--output-dir", str(out), "--set", "train.epochs=1"]) == 0
    assert (out / "plain" / "seed_0" / "result.json").stat().st_mtime_ns == stamp, "finished runs are skipped"


def test_sweep_on_the_demo_task(tmp_path):
    out = tmp_path / "alpha"
    assert main(["sweep", "alpha", "--quick", "--values", "0", "--seeds", "2", "--output-dir", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,position,log2_alpha,seed,accuracy") and len(rows) == 1 + 6 * 2
    assert (out / "alpha.png").read_bytes()[:4] == PNG


def test_alpha_sweep_takes_lora_and_metapeft_side_by_side(tmp_path):
    out = tmp_path / "rescue"
    assert main(["sweep", "alpha", "--quick", "--values", "3", "--methods", "plain", "meta", "--positions", "all",
                 "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert [(row["method"], row["position"], row["log2_alpha"]) for row in summary] == [("plain", "all", 3.0),
                                                                                     ("meta", "all", 3.0)]
    meta = json.loads((out / "meta_all_log2alpha_3" / "seed_0" / "result.json").read_text())
    assert meta["gamma"] is not None and len(meta["gamma"]["columns"]) == 6


def test_sweep_usage_errors(write_config, tmp_path, capsys):
    assert main(["sweep", "meta_interval", "--values", "0", "--quick", "--output-dir", str(tmp_path)]) == 2
    assert "meta interval" in capsys.readouterr().err
    assert main(["sweep", "meta_ratio", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
