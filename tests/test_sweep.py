"""``metapeft.sweep``: grids, skip-if-done and resume, tables against a brute-force summary, plots, and real
fine-tuning cells on the demo task (placement, meta-step counts, parallel processes = serial)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from metapeft.demo import QUICK, DemoTask
from metapeft.sweep import (
    Cell,
    alpha_cells,
    meta_interval_cells,
    parse_interval,
    parse_values,
    position_cells,
    run_cell,
    run_grid,
    run_sweep,
    with_seeds,
)

PNG = b"\x89PNG"


class RecordingTask:
    """A task without training: metrics are a fixed function of the cell, every run is recorded, and the run of
    ``stop_at`` (a cell key) raises ``KeyboardInterrupt`` as a Ctrl-C would."""

    def __init__(self, stop_at: str | None = None) -> None:
        self.runs, self.prepared, self.stop_at = [], 0, stop_at

    def prepare(self) -> str:
        self.prepared += 1
        return ""

    def layout(self):
        return ("0", "1"), ("q", "mlp1")

    def run(self, cell, run_dir):
        if cell.key == self.stop_at:
            raise KeyboardInterrupt
        self.runs.append(cell.key)
        accuracy = 0.5 + 0.03 * cell.seed + 0.01 * len(cell.name)
        gamma = {"rows": ["0", "1"], "columns": ["q", "mlp1"], "values": [[1.0 + cell.seed, None], [0.5, 2.0]]}
        return {"metrics": {"accuracy": accuracy, "class_mean_accuracy": accuracy - 0.01,
                            "many_accuracy": accuracy + 0.1, "few_accuracy": accuracy - 0.1, "macro_f1": accuracy,
                            "per_class_accuracy": [accuracy]},
                "seconds": 1.0 + cell.seed, "cpu_seconds": 0.5 + cell.seed,
                "gamma": gamma if cell.peft.get("meta") else None}


def test_grids():
    cells = position_cells(("0", "1"), ("q", "mlp1"))
    assert [c.name for c in cells] == ["block_0_q", "block_0_mlp1", "block_1_q", "block_1_mlp1", "metapeft"]
    assert cells[1].peft == {"meta": False, "positions": ["mlp1"], "layers": [0]} and cells[1].train == {"meta": False}
    assert cells[-1].peft == {"meta": True} and cells[-1].point["meta"]
    alphas = alpha_cells(("q",), (-2, 3))
    assert [c.peft["alpha"] for c in alphas] == [0.25, 8.0] and not any(c.peft["meta"] for c in alphas)
    assert alphas[1].point == {"method": "plain", "position": "q", "log2_alpha": 3}
    both = alpha_cells(("q", "all"), (3,), methods=("plain", "meta"))
    assert [c.name for c in both] == ["plain_q_log2alpha_3", "plain_all_log2alpha_3", "meta_q_log2alpha_3",
                                      "meta_all_log2alpha_3"]
    assert both[3].peft == {"meta": True, "alpha": 8.0} and both[3].train == {"meta": True}
    assert both[0].peft == {"meta": False, "positions": ["q"], "alpha": 8.0}
    with pytest.raises(ValueError, match="methods"):
        alpha_cells(("q",), (0,), methods=("lora",))
    intervals = meta_interval_cells((1, "epoch"), ("exact", "first_order"))
    assert [c.name for c in intervals] == ["plain", "exact_every_1", "exact_every_epoch", "first_order_every_1",
                                           "first_order_every_epoch"]
    assert intervals[2].train == {"meta": True, "meta_mode": "exact", "meta_interval": "epoch"}
    own_mode = meta_interval_cells((2,))
    assert own_mode[1].name == "task_every_2" and own_mode[1].train == {"meta": True, "meta_interval": 2}
    seeded = with_seeds(cells[:2], [3, 4])
    assert [c.key for c in seeded] == ["block_0_q/seed_3", "block_0_mlp1/seed_3", "block_0_q/seed_4",
                                       "block_0_mlp1/seed_4"]
    assert parse_interval("epoch") == "epoch" and parse_interval("5") == 5
    for bad in ("0", "-1", "every"):
        with pytest.raises(ValueError, match="meta interval"):
            parse_interval(bad)


def test_sweep_tables_plot_skip_if_done_and_resume(tmp_path):
    out = tmp_path / "sweep"
    task = RecordingTask()
    result = run_sweep("positions", task, out, seeds=(0, 1), progress=False)
    assert len(task.runs) == 10 and task.prepared == 1
    assert (out / "positions.png").read_bytes()[:4] == PNG
    rows = list((out / "results.csv").read_text().splitlines())
    assert rows[0] == ("meta,block,position,seed,accuracy,class_mean_accuracy,many_accuracy,few_accuracy,macro_f1,"
                       "seconds,cpu_seconds,diverged_at_step") and len(rows) == 11
    # brute force: each grid point's mean and std over the two seeds, from the cells' own result files
    for row in result["summary"]:
        name = "metapeft" if row["meta"] else f"block_{row['block']}_{row['position']}"
        accuracies = [json.loads((out / name / f"seed_{s}" / "result.json").read_text())["metrics"]["accuracy"]
                      for s in (0, 1)]
        assert row["seeds"] == 2 and row["diverged"] == 0
        assert row["accuracy_mean"] == pytest.approx(statistics.fmean(accuracies))
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
        assert row["seconds_mean"] == pytest.approx(1.5) and row["cpu_seconds_mean"] == pytest.approx(1.0)
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary == json.loads(json.dumps(result["summary"]))
    assert "| meta | block | position | seeds | diverged | accuracy |" in (out / "results.md").read_text()

    again = RecordingTask()
    run_sweep("positions", again, out, seeds=(0, 1), progress=False)
    assert again.runs == [] and again.prepared == 0, "finished cells are skipped"
    (out / "block_1_q" / "seed_0" / "result.json").unlink()
    run_sweep("positions", again, out, seeds=(0, 1), progress=False)
    assert again.runs == ["block_1_q/seed_0"]

    # a sweep stopped by Ctrl-C resumes where it stopped
    fresh = tmp_path / "stopped"
    stopping = RecordingTask(stop_at="block_1_q/seed_0")
    with pytest.raises(KeyboardInterrupt):
        run_sweep("positions", stopping, fresh, seeds=(0, 1), progress=False)
    assert stopping.runs == ["block_0_q/seed_0", "block_0_mlp1/seed_0"]
    resumed = RecordingTask()
    run_sweep("positions", resumed, fresh, seeds=(0, 1), progress=False)
    assert len(resumed.runs) == 8 and not set(resumed.runs) & set(stopping.runs)
    assert (fresh / "results.csv").read_text() == (out / "results.csv").read_text()


def test_foreign_result_and_repeated_cells_are_errors(tmp_path):
    cell = Cell("point", {"meta": False}, seed=0)
    run_grid(RecordingTask(), [cell], tmp_path, progress=False)
    other = Cell("point", {"meta": False}, seed=0, train={"lr": 0.1})
    with pytest.raises(ValueError, match="result of another run"):
        run_grid(RecordingTask(), [other], tmp_path, progress=False)
    with pytest.raises(ValueError, match="repeated"):
        run_grid(RecordingTask(), [cell, cell], tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="sweep kind"):
        run_sweep("depth", RecordingTask(), tmp_path / "c", progress=False)


@pytest.fixture(scope="module")
def quick_task(tmp_path_factory):
    """The demo task at its quick size, with its source backbone pre-trained once into a temporary cache."""
    task = DemoTask(QUICK, str(tmp_path_factory.mktemp("cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two loaded cores run these tiny matrices many times slower
    try:
        task.prepare()
    finally:
        torch.set_num_threads(threads)
    return task


@pytest.mark.parametrize("block, position, module", [(1, "mlp1", "blocks.1.mlp.fc1"), (0, "q", "blocks.0.attn.qkv")])
def test_position_cell_trains_one_module(quick_task, tmp_path, block, position, module):
    cell = next(c for c in position_cells(*quick_task.layout()) if c.point.get("block") == str(block)
                and c.point.get("position") == position)
    record = run_cell(quick_task, cell, tmp_path)
    lora = {key.rsplit(".", 1)[0] for key in load_file(str(tmp_path / "model.safetensors")) if "lora" in key}
    assert lora == {module}
    assert record["gamma"] is None and 0.0 <= record["metrics"]["accuracy"] <= 1.0


def test_meta_interval_cells_take_the_asked_meta_steps(quick_task, tmp_path):
    result = run_sweep("meta_interval", quick_task, tmp_path, values=[5, "epoch"], modes=["first_order"],
                       progress=False)
    steps_per_epoch = -(-len(quick_task.tasks().target_train) // QUICK.batch_size)
    total = steps_per_epoch * QUICK.finetune_epochs
    for name, every in (("plain", None), ("first_order_every_5", 5), ("first_order_every_epoch", steps_per_epoch)):
        log = [json.loads(line) for line in (tmp_path / name / "seed_0" / "metrics.jsonl").read_text().splitlines()]
        meta_steps = sum("meta_loss" in r for r in log if r["event"] == "step")
        assert meta_steps == (0 if every is None else sum(step % every == 0 for step in range(total))), name
    assert [row["meta_interval"] for row in result["summary"]] == ["-", 5, "epoch"]
    assert (tmp_path / "meta_interval.png").read_bytes()[:4] == PNG


@pytest.mark.slow
def test_parallel_jobs_equal_serial_runs(quick_task, tmp_path):
    """Cells run in two spawned processes give bit-identical results and weights to the same cells in-process
    (slow: each worker imports torch, about 10 s per process on 2 loaded cores)."""
    cells = with_seeds(meta_interval_cells((4,), ("exact",)), [0])
    serial = run_grid(quick_task, cells, tmp_path / "serial", progress=False)
    parallel = run_grid(quick_task, cells, tmp_path / "parallel", jobs=2, progress=False)
    for a, b in zip(serial, parallel):
        assert a["cell"] == b["cell"] and a["metrics"] == b["metrics"] and a["gamma"] == b["gamma"]
        weights = [load_file(str(tmp_path / run / a["cell"]["name"] / "seed_0" / "model.safetensors"))
                   for run in ("serial", "parallel")]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_alpha_sweep_rejects_unknown_positions_and_options_of_other_sweeps(tmp_path):
    with pytest.raises(ValueError, match="unknown position"):
        run_sweep("alpha", RecordingTask(), tmp_path, positions=["qk"], progress=False)
    with pytest.raises(ValueError, match="alpha sweep"):
        run_sweep("meta_ratio", RecordingTask(), tmp_path, methods=["meta"], progress=False)


def test_a_diverged_cell_is_recorded_at_chance_and_the_grid_goes_on(quick_task, tmp_path):
    """alpha = 2^20 sends plain LoRA to NaN within the first steps: the cell records step and cause, scores chance
    level (1 / classes), the table counts it and the plot marks it; the other cell still runs."""
    result = run_sweep("alpha", quick_task, tmp_path, values=[0, 20], positions=["all"], progress=False)
    diverged = json.loads((tmp_path / "plain_all_log2alpha_20" / "seed_0" / "result.json").read_text())
    assert diverged["diverged"]["step"] >= 1 and diverged["diverged"]["cause"] in ("loss", "gradient")
    assert diverged["metrics"]["accuracy"] == pytest.approx(0.1) and diverged["gamma"] is None
    fine = json.loads((tmp_path / "plain_all_log2alpha_0" / "seed_0" / "result.json").read_text())
    assert fine["diverged"] is None
    assert [row["diverged"] for row in result["summary"]] == [0, 1]
    assert "| diverged |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "alpha.png").read_bytes()[:4] == PNG


def test_parse_values():
    assert parse_values("alpha", ["-2", "0.5"]) == [-2.0, 0.5]
    assert parse_values("meta_ratio", ["0.1"]) == [0.1]
    assert parse_values("meta_interval", ["3", "epoch"]) == [3, "epoch"]
    with pytest.raises(ValueError, match="meta ratio"):
        parse_values("meta_ratio", ["1.5"])
    with pytest.raises(ValueError, match="numbers"):
        parse_values("alpha", ["big"])
