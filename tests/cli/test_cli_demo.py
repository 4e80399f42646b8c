"""``metapeft demo --quick`` finishes in the test suite: table, plots, results, cached backbone."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from metapeft import demo
from metapeft.cli import main
from metapeft.data import digits_tasks


def test_demo_quick_end_to_end(tmp_path, capsys):
    out_dir, cache = tmp_path / "demo", tmp_path / "cache"
    assert main(["demo", "--quick", "--output-dir", str(out_dir), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "SMALL-SCALE DEMONSTRATION" in out and "pre-trained the source backbone" in out
    assert "| LoRA            |" in out and "| LoRA + MetaPEFT |" in out
    assert "many" in out and "medium" in out and "few" in out
    for name in ("gamma_heatmap.png", "training_curves.png"):
        assert (out_dir / name).read_bytes()[:4] == b"\x89PNG", name
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results["rows"]) == {"LoRA", "LoRA + MetaPEFT"}
    for metrics in results["rows"].values():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_samples"] == 300
    assert results["class_split"] == {"many": [0, 1, 2], "medium": [3, 4, 5], "few": [6, 7, 8, 9]}
    plain = [json.loads(line) for line in (out_dir / "lora" / "metrics.jsonl").read_text().splitlines()]
    meta = [json.loads(line) for line in (out_dir / "lora_meta" / "metrics.jsonl").read_text().splitlines()]
    plain_gammas = [g for r in plain if r["event"] == "epoch" for v in r["gammas"].values() for g in v]
    meta_gammas = [g for r in meta if r["event"] == "epoch" for v in r["gammas"].values() for g in v]
    assert plain_gammas and all(abs(g - 1.0) < 1e-6 for g in plain_gammas)
    assert any(abs(g - 1.0) > 1e-3 for g in meta_gammas)
    assert any("meta_loss" in r for r in meta) and not any("meta_loss" in r for r in plain)

    # the source backbone is cached: the second call loads the same weights
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    model, note = demo.cached_backbone(demo.QUICK, digits_tasks(), cache, seed=0)
    assert note.startswith("loaded the cached source backbone")
    fresh = demo.build_vit(demo.QUICK)
    stored = load_file(str(files[0]))
    assert all(torch.equal(model.state_dict()[k], stored[k]) for k in fresh.state_dict())

    # a second run from the cached backbone reproduces the first run's numbers exactly
    again = demo.run_demo(quick=True, output_dir=tmp_path / "again", cache_dir=cache)
    assert again["rows"] == results["rows"]
    assert "loaded the cached source backbone" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_default_size(tmp_path, capsys):
    """The README's command at its default size (about 1.5 minutes on 2 CPU cores including pre-training)."""
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache")]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["size"] == dataclasses.asdict(demo.FULL)
    assert all(metrics["accuracy"] > 0.3 for metrics in results["rows"].values())
    assert "SMALL-SCALE DEMONSTRATION" in capsys.readouterr().out
