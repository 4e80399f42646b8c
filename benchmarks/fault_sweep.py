"""Fault sweep of issue 20: every failure a user can cause, tried through its tests, and whether each case held.

Run: ``python benchmarks/fault_sweep.py`` from the repository root (``--quick``: the first test of each case). Each
case of the issue names the tests that try it (pytest node ids, narrowed by a keyword where a parametrized test
covers several cases); one pytest run executes them all and the script prints a markdown table (case, tests tried,
passed, skipped, held) with totals. A case holds when every test of it that ran passed; a test skipped here (the real
full-device test needs root for its tmpfs) is reported, not counted as held or failed. ``--output FILE`` appends the
table, with the date and git sha, to FILE (e.g. ``benchmarks/results/fault_sweep.md``).
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
T = "tests/"
# (group, case, [(node id prefix, keyword or None), ...])
CASES = [
    ("silent", "NaN images in an evaluation set", [
        (T + "trainer/test_evaluation.py::test_nan_images", None),
        (T + "trainer/test_evaluation.py::test_nan_logits", None),
        (T + "trainer/test_ddp.py::test_a_data_error_on_one_rank_ends_every_rank", None)]),
    ("silent", "out-of-range evaluation label lost the epoch", [
        (T + "trainer/test_evaluation.py::test_an_out_of_range_label", None),
        (T + "trainer/test_evaluation.py::test_a_run_resumed_from_an_epoch_checkpoint", None)]),
    ("silent", "resume on other data or another frozen backbone", [
        (T + "trainer/test_checkpointing.py::test_a_resume_on", None)]),
    ("silent", "mid-epoch resume with DataLoader workers", [
        (T + "trainer/test_checkpointing.py::test_a_mid_epoch_resume_with_workers_is_exact", None),
        (T + "data/test_data_seeded.py", None)]),
    ("silent", "FusedMetaLoRA / FusedMetaAdapter alpha NaN or inf", [
        (T + "layers/test_lora.py::test_bad_construction_arguments_are_named", "alpha"),
        (T + "layers/test_fused_meta_adapter.py::test_bad_construction_raises_naming_the_argument", "alpha")]),
    ("silent", "gamma leaves a sane range", [(T + "trainer/test_gamma_range.py", None)]),
    ("misleading", "NaN training image (cosine head init, training step)", [
        (T + "trainer/test_evaluation.py::test_a_nan_training_image", None),
        (T + "trainer/test_nonfinite.py::test_a_nan_training_image_is_named", None)]),
    ("misleading", "load_adapter while another process saves", [
        (T + "test_atomic_files.py::test_loads_while_another_process", None),
        (T + "test_atomic_files.py::test_a_read_that_fails_because_the_file_was_replaced", None)]),
    ("misleading", "disk full", [(T + "test_atomic_files.py::test_a_full_device", None),
                                 (T + "test_atomic_files.py::test_a_real_full_device", None)]),
    ("misleading", "corrupt / empty / non-mapping config.yaml, model.kwargs typo, train key", [
        (T + "test_run_directories.py::test_a_damaged_recorded_config", None),
        (T + "test_run_directories.py::test_a_typo", None),
        (T + "test_run_directories.py::test_an_unknown_train_key", None), (T + "test_config_files.py", None)]),
    ("misleading", "load_adapter of a deeper model's adapter", [
        (T + "test_adapter_save_load.py::test_an_adapter_of_a_deeper_model", None)]),
    ("misleading", "training set no larger than batch_size", [
        (T + "trainer/test_trainer.py::test_a_batch_no_smaller", None)]),
    ("misleading", "start failed before its first checkpoint", [
        (T + "test_run_directories.py::test_a_start_that_failed", None),
        (T + "trainer/test_run_dir.py::test_a_trainer_run_that_stopped", None)]),
    ("misleading", "build_info from a source root shadowing an install", [(T + "test_build_info.py", None)]),
    ("misleading", "long file names (218-byte targets, --overwrite of 250)", [
        (T + "test_atomic_files.py::test_a_valid_long_file_name", None),
        (T + "trainer/test_run_dir.py::test_overwrite_moves_aside_a_run_whose_name", None)]),
    ("misleading", "vmap(randomness='different') over dropout", [(T + "ops/test_dropout.py", None)]),
]


class Outcomes:
    """A pytest plugin recording each test's outcome (a failure in setup or teardown counts as failed)."""

    def __init__(self) -> None:
        self.by_test: dict[str, str] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed or report.when == "call" or (report.when == "setup" and report.skipped):
            if self.by_test.get(report.nodeid) != "failed":
                self.by_test[report.nodeid] = report.outcome


def selected(node: str, prefix: str, keyword: str | None) -> bool:
    return node.startswith(prefix) and (keyword is None or keyword in node.split("::", 1)[-1])


def table(outcomes: dict[str, str]) -> tuple[list[str], int, int]:
    """Markdown rows per case, the number of cases tried and held."""
    rows = ["| group | case | tests | passed | skipped | held |", "|---|---|---|---|---|---|"]
    tried = held = 0
    for group, case, selectors in CASES:
        tests = [o for node, o in outcomes.items() if any(selected(node, p, k) for p, k in selectors)]
        passed, skipped = tests.count("passed"), tests.count("skipped")
        ok = bool(tests) and passed + skipped == len(tests) and passed > 0
        tried, held = tried + bool(tests), held + ok
        rows.append(f"| {group} | {case} | {len(tests)} | {passed} | {skipped} | {'yes' if ok else '**no**'} |")
    counts = list(outcomes.values())
    rows.append(f"| | **{tried} cases tried, {held} held** | {len(counts)} | {counts.count('passed')} | "
                f"{counts.count('skipped')} | |")
    return rows, tried, held


def node_ids(quick: bool) -> list[str]:
    """The tests to run: every selected test, or with ``quick`` the first of each case."""
    files = sorted({prefix.split("::")[0] for _, _, selectors in CASES for prefix, _ in selectors})
    collected: list[str] = []

    class Collect:
        def pytest_collection_modifyitems(self, items) -> None:
            collected.extend(item.nodeid for item in items)

    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *files], plugins=[Collect()])
    chosen = []
    for _, _, selectors in CASES:
        tests = [n for n in collected if any(selected(n, p, k) for p, k in selectors)]
        chosen += tests[:1] if quick else tests
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print (and with ``--output`` append) the table; exit status 1 when a case did not hold."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run only the first test of each case")
    parser.add_argument("--output", type=Path, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    outcomes = Outcomes()
    pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:randomly", *node_ids(args.quick)], plugins=[outcomes])
    rows, tried, held = table(outcomes.by_test)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    text = "\n".join([f"fault sweep {datetime.date.today()} at {sha.strip() or 'unknown sha'}"
                      f"{' (--quick)' if args.quick else ''}:", "", *rows])
    print(text)
    if args.output is not None:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(text + "\n\n")
    return 0 if tried == held == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
