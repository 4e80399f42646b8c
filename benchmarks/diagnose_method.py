"""Why the modulator could not rescue a bad scale: the diagnostics of docs/method.md, as plots anyone can rerun.

Run: ``python benchmarks/diagnose_method.py`` (about 3 minutes on one core; ``--out DIR``, default
``docs/figures``). Everything runs on the demo task's validation split (:func:`metapeft.demo.validation_tasks`),
seeds 100-105, LoRA r = 4 on every position of every block, and writes PNGs plus ``method_diagnostics.json``:

1. ``effective_lr.png``: the one-step look-ahead meta loss ``L_val(phi - lr * grad L_train)`` against a common factor
   on every gamma, at alpha = r/8, r and 8r: the scale acts on the LoRA's step like lr * (gamma * alpha / r)^2.
2. ``hypergradient_vs_fd.png``: at step 0, d L_val(phi_1(rho)) / d log(gamma_m) per module from the ``exact`` and
   ``first_order`` hypergradients against a central finite difference of the same meta loss (the look-ahead
   recomputed at gamma_m * exp(+-h)), at alpha = r and 8r; and the common-scale derivative (their sum).
3. ``gamma_trajectories.png``: gamma of every module after each epoch of LoRA + MetaPEFT (shipped defaults) at
   alpha = r and 8r, and with the common-scale warm-up at 8r.
4. ``first_steps.png``: training loss over the first 40 steps, LoRA vs LoRA + MetaPEFT at alpha = r and 8r (mean over
   seeds and the worst MetaPEFT seed).
5. ``method_diagnostics.json``: the numbers behind the plots, and how far one outer step can move gamma under each
   outer optimizer and parametrisation (measured on the step-0 hypergradients).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from metapeft.demo import FULL, DemoTask, cached_backbone  # noqa: E402
from metapeft.inject import inject  # noqa: E402
from metapeft.meta import hypergradient  # noqa: E402
from metapeft.meta.optim import meta_optimizer  # noqa: E402
from metapeft.modulator import gamma_from_modulator, log_gamma_gradient, modulator_from_gamma  # noqa: E402
from metapeft.params import meta_parameters, modulators_with_constraints  # noqa: E402
from metapeft.sweep import META, PLAIN, Cell, run_grid, with_seeds  # noqa: E402
from metapeft.trainer import MetaPEFTTrainer  # noqa: E402

SEEDS = tuple(range(100, 106))
ALPHAS = {"alpha = r/8": 0.5, "alpha = r": 4.0, "alpha = 8r": 32.0}
FACTORS = (1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)


def step_zero(task: DemoTask, alpha: float, seed: int, constraint: str = "softplus"):
    """The demo model with LoRA at ``alpha`` (init seed ``seed``), its trainer's loss, and a train batch and a meta
    batch drawn from the validation task's training images."""
    tasks = task.tasks()
    model, _ = cached_backbone(task.size, tasks, task._cache(), task.data_seed)
    torch.manual_seed(seed)
    inject(model, method="lora", rank=task.size.rank, alpha=alpha, constraint=constraint)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = MetaPEFTTrainer(model, tasks.target_train,
                                  config=task.trainer_config(Cell("d", {}, seed, {}, META), Path(run_dir)))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(tasks.target_train), generator=generator)
    train, val = order[: task.size.batch_size], order[task.size.batch_size: 2 * task.size.batch_size]
    data = tasks.target_train
    return model, trainer.step.loss_fn, (data.images[train], data.labels[train]), (data.images[val], data.labels[val])


def lookahead_loss(model, loss_fn, train, val, lr: float) -> float:
    """L_val after one plain SGD step of lr on the train batch (the first-order hypergradient's val loss)."""
    return float(hypergradient(model, loss_fn, train, val, lr=lr, mode="first_order").val_loss)


@torch.no_grad()
def scale_all(model, factor: float, base: list[torch.Tensor]) -> None:
    """Set every modulator to gamma0 * factor (``base``: the modulators' values at gamma0)."""
    for (rho, constraint), b in zip(modulators_with_constraints(model), base):
        rho.copy_(modulator_from_gamma(gamma_from_modulator(b, constraint) * factor, constraint))


def effective_lr(task: DemoTask, lr: float) -> dict:
    """Item 1: one-step meta loss vs a common factor on gamma, per alpha (mean over seeds)."""
    curves = {}
    for name, alpha in ALPHAS.items():
        losses = []
        for seed in SEEDS:
            model, loss_fn, train, val = step_zero(task, alpha, seed)
            base = [rho.detach().clone() for rho in meta_parameters(model)]
            row = []
            for factor in FACTORS:
                scale_all(model, factor, base)
                row.append(lookahead_loss(model, loss_fn, train, val, lr))
            losses.append(row)
        curves[name] = [sum(col) / len(col) for col in zip(*losses)]
    return {"factors": list(FACTORS), "meta_loss": curves}


def fd_check(task: DemoTask, lr: float, h: float = 0.05) -> dict:
    """Item 2: per-module d L_val / d log(gamma) at step 0, exact and first-order vs a central finite difference."""
    out = {}
    for name in ("alpha = r", "alpha = 8r"):
        model, loss_fn, train, val = step_zero(task, ALPHAS[name], SEEDS[0], constraint="exp")
        pairs = modulators_with_constraints(model)
        exact = hypergradient(model, loss_fn, train, val, lr=lr, mode="exact").meta_grads
        first = hypergradient(model, loss_fn, train, val, lr=lr, mode="first_order").meta_grads
        fd = []
        for rho, _ in pairs:
            for j in range(rho.numel()):
                values = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        rho.view(-1)[j] += sign * h
                    values.append(lookahead_loss(model, loss_fn, train, val, lr))
                    with torch.no_grad():
                        rho.view(-1)[j] -= sign * h
                fd.append((values[0] - values[1]) / (2 * h))
        flat = {mode: [float(v) for g, (rho, c) in zip(grads, pairs) for v in log_gamma_gradient(g, rho, c).flatten()]
                for mode, grads in (("exact", exact), ("first_order", first))}
        out[name] = {**flat, "finite_difference": fd, "common": {k: sum(v) for k, v in
                                                                 {**flat, "finite_difference": fd}.items()},
                     "positive": sum(v > 0 for v in fd), "modules": len(fd)}
        out[name]["gamma_step"] = outer_step_sizes(model, exact)
    return out


def outer_step_sizes(model, grads: list[torch.Tensor]) -> dict:
    """Item 5: max and median |change of log gamma| that one outer step makes from ``grads``, per optimizer x
    parametrisation, at meta_lr 0.05 (the demo's)."""
    sizes = {}
    for optimizer in ("adam", "shared_adam", "sgd"):
        for constraint in ("softplus", "exp"):
            rho = [torch.zeros_like(g, requires_grad=True) for g in grads]
            before = [torch.nn.functional.softplus(r) if constraint == "softplus" else r.exp() for r in rho]
            opt = meta_optimizer(optimizer, rho, 0.05)
            for r, g in zip(rho, grads):
                r.grad = g.clone()
            opt.step()
            after = [torch.nn.functional.softplus(r) if constraint == "softplus" else r.exp() for r in rho]
            moves = torch.cat([(a / b).log().abs().flatten() for a, b in zip(after, before)]).detach()
            sizes[f"{optimizer}, {constraint}"] = {"max": float(moves.max()), "median": float(moves.median())}
    return sizes


def trajectories(task: DemoTask, work: Path) -> dict:
    """Items 3-4: runs of LoRA and LoRA + MetaPEFT (shipped defaults; with the warm-up at 8r) on the seeds; per run
    the gamma table after every epoch and the training loss per step."""
    cells = [Cell(f"{kind}_{tag}", {}, 0, {**flags, "alpha": alpha}, {**flags, **extra})
             for tag, alpha in (("r", 4.0), ("8r", 32.0))
             for kind, flags, extra in (("lora", PLAIN, {}), ("meta", META, {}),
                                        ("warmup", META, {"meta_warmup_steps": 4}))]
    run_grid(task, with_seeds(cells, SEEDS), work, jobs=2, progress=False)
    runs = {}
    for cell in cells:
        for seed in SEEDS:
            log = [json.loads(line) for line in (work / cell.name / f"seed_{seed}" / "metrics.jsonl").open()]
            runs[f"{cell.name}/{seed}"] = {
                "loss": [r["train_loss"] for r in log if r["event"] == "step"],
                "gammas": [r["gammas"] for r in log if r["event"] == "epoch" and r.get("gammas")],
                "accuracy": json.loads((work / cell.name / f"seed_{seed}" / "result.json").read_text())
                ["metrics"]["accuracy"]}
    return runs


def plot(results: dict, out: Path) -> None:
    """The four PNGs of the module docstring."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for name, losses in results["effective_lr"]["meta_loss"].items():
        axes.plot(results["effective_lr"]["factors"], losses, marker="o", label=name)
    axes.set(xscale="log", xlabel="common factor on every gamma", ylabel="meta loss after one SGD step",
             title="one-step look-ahead meta loss vs scale (step 0, mean of 6 seeds)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "effective_lr.png", dpi=120)

    figure = Figure(figsize=(10, 4))
    for axes, (name, values) in zip(figure.subplots(1, 2), results["fd_check"].items()):
        fd = values["finite_difference"]
        for mode, marker in (("exact", "o"), ("first_order", "x")):
            axes.scatter(fd, values[mode], marker=marker, label=mode)
        bound = max(abs(v) for v in fd + values["exact"]) * 1.1
        axes.plot([-bound, bound], [-bound, bound], color="gray", lw=1)
        axes.set(xlabel="finite difference of the meta loss", ylabel="hypergradient",
                 title=f"{name}: d L_val / d log gamma per module")
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "hypergradient_vs_fd.png", dpi=120)

    runs = results["runs"]
    figure = Figure(figsize=(13, 4))
    for axes, name in zip(figure.subplots(1, 3), ("meta_r", "meta_8r", "warmup_8r")):
        for seed in SEEDS[:3]:
            gammas = runs[f"{name}/{seed}"]["gammas"]
            for module in gammas[0]:
                for j in range(len(gammas[0][module])):
                    axes.plot(range(1, len(gammas) + 1), [g[module][j] for g in gammas], lw=0.6, alpha=0.6)
        axes.set(yscale="log", xlabel="epoch", ylabel="gamma", title=f"{name}: every module, 3 seeds")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "gamma_trajectories.png", dpi=120)

    figure = Figure(figsize=(10, 4))
    for axes, tag in zip(figure.subplots(1, 2), ("r", "8r")):
        for kind, color in (("lora", "tab:blue"), ("meta", "tab:red"), ("warmup", "tab:green")):
            losses = [runs[f"{kind}_{tag}/{seed}"]["loss"][:40] for seed in SEEDS]
            axes.plot([sum(c) / len(c) for c in zip(*losses)], color=color, label=f"{kind} (mean)")
            worst = min(SEEDS, key=lambda s: runs[f"{kind}_{tag}/{s}"]["accuracy"])
            axes.plot(runs[f"{kind}_{tag}/{worst}"]["loss"][:40], color=color, ls=":", label=f"{kind} (worst seed)")
        axes.set(xlabel="step", ylabel="training loss", title=f"alpha = {tag}: the first 40 steps")
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "first_steps.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/figures")
    parser.add_argument("--work-dir", default="metapeft-diagnostics")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = DemoTask(FULL, split="validation")
    task.prepare()
    lr = task.size.lr
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    results = {"effective_lr": effective_lr(task, lr), "fd_check": fd_check(task, lr), "runs": trajectories(task, work)}
    plot(results, out)
    summary = {k: v for k, v in results.items() if k != "runs"}
    summary["accuracy"] = {name: sum(results["runs"][f"{name}/{s}"]["accuracy"] for s in SEEDS) / len(SEEDS)
                           for name in {key.split("/")[0] for key in results["runs"]}}
    (out / "method_diagnostics.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "fd_check"}, indent=1))
    for name, values in summary["fd_check"].items():
        print(name, "common:", values["common"], "positive:", values["positive"], "/", values["modules"],
              "outer step sizes:", values["gamma_step"])


if __name__ == "__main__":
    main()
