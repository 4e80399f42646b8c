"""``metapeft demo`` from the command line: seeds, the multi-seed table, the README section it rewrites."""

from __future__ import annotations

import dataclasses
import json

import pytest

from metapeft import demo
from metapeft.cli import main


def test_demo_quick_with_seeds_and_readme(tmp_path, capsys):
    out, readme = tmp_path / "demo", tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-table:start -->\nold\n<!-- demo-table:end -->\n")
    assert main(["demo", "--quick", "--seeds", "2", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--readme", str(readme)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["table"] in printed and results["table"] in readme.read_text()
    assert "| LoRA + MetaPEFT |" in printed and "| difference (95% CI) |" in printed
    assert "old" not in readme.read_text()


def test_demo_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--seeds", "0"])
    assert "--seeds" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_default_size(tmp_path, capsys):
    """The README's command at its default size and seeds (a few minutes on 2 CPU cores, pre-training included)."""
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache")]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["size"] == dataclasses.asdict(demo.FULL) and len(results["seeds"]) == demo.DEFAULT_SEEDS
    assert all(m["accuracy"] > 0.3 for runs in results["runs"].values() for m in runs)
    assert "SMALL-SCALE DEMONSTRATION" in capsys.readouterr().out
