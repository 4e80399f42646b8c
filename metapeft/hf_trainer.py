"""MetaPEFT inside the Hugging Face ``transformers.Trainer``: :class:`HFMetaPEFTTrainer`, a ``Trainer`` whose steps
carry meta steps on the modulators, and :class:`MetaArguments`, their settings.

Per optimizer step t of the Trainer (the meta step before its first micro-batch, when ``t % meta_interval == 0``):

- meta step: the hypergradient of the meta loss L_val(phi_K) (:func:`metapeft.meta.hypergradient`) through K =
  ``meta_lookahead_steps`` look-ahead steps of the optimizer the Trainer really uses (:func:`metapeft.meta.optim.
  inner_rule_for`: torch's AdamW, the Trainer's default, or SGD; its live state, learning rate and per-group weight
  decay; gradients clipped to ``max_grad_norm`` as the Trainer clips them, :class:`metapeft.meta.inner.ClippedRule`),
  the first on the step's own batch (with gradient accumulation all its micro-batches, each loss scaled as the
  Trainer scales it, so the look-ahead's gradient is the one the Trainer accumulates), the others on batches of the
  step's size drawn from the training part; L_val on a meta batch drawn from the meta set; then one step of the
  outer optimizer (Adam) on rho;
- inner step: the Trainer's own ``training_step`` (forward, backward, clipping, optimizer and scheduler step) with
  the new rho (DARTS' alternating order; metapeft's trainer with ``meta_reuse_lookahead=False``).

The meta set is carved from ``train_dataset`` once, by a seeded random draw of ``meta_ratio`` of its samples (a
language-model dataset has no classes to stratify), and held out of the Trainer's training set; or given as
``meta_dataset``. Every draw (meta set, meta batches, look-ahead batches) is a function of (seed, outer step)
(:mod:`metapeft.data.sampling`). The modulators are kept out of the Trainer's optimizer, backward and gradient
clipping (``requires_grad`` is off outside the meta step). Each record the Trainer logs gains ``gamma/<module>``
(``gamma/<module>/<segment>`` for a module with several segments; mean and ``gamma_std/<module>`` for a per-channel
gamma) and the last ``meta_loss``.

A checkpoint the Trainer writes also holds ``meta_state.pt`` (:data:`META_STATE_NAME`: the outer optimizer's state and
the outer-step count, a :func:`metapeft.atomic_files.save_checkpoint` file), which ``train(resume_from_checkpoint=
...)`` reads back, so a resumed run takes the meta steps an uninterrupted one would; a checkpoint without it (written
by another Trainer) is refused, naming the file.

Needs the optional ``transformers`` package (``pip install "metapeft[hf]"``); importing this module without it
raises an ``ImportError`` naming that extra. One process only (no DDP / FSDP / DeepSpeed yet).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import Subset

from metapeft.atomic_files import load_checkpoint, save_checkpoint
from metapeft.data.sampling import META_BATCH, META_SET, generator_for, lookahead_batches, uniform_batch
from metapeft.inject import peft_modules, unwrap_model
from metapeft.meta import MODES, hypergradient
from metapeft.meta.optim import META_OPTIMIZERS, inner_rule_for, meta_optimizer
from metapeft.params import meta_parameters, trainable_phi
from metapeft.schema import option

HF_EXTRA = 'pip install "metapeft[hf]"'
META_STATE_NAME = "meta_state.pt"

try:
    import transformers
except ImportError as error:
    raise ImportError(f"metapeft.hf_trainer needs the transformers package: {HF_EXTRA} (or pip install "
                      f"transformers)") from error


@dataclass
class MetaArguments:
    """The meta-learning settings of :class:`HFMetaPEFTTrainer` (the Trainer's own stay in ``TrainingArguments``)."""

    meta_ratio: float = option(0.2, "share of train_dataset carved out as the meta set (held out of training), in "
                                    "(0, 1); unused when meta_dataset is given")
    meta_batch_size: int | None = option(None, "samples per meta batch; null: per_device_train_batch_size")
    meta_interval: int = option(5, "optimizer steps per meta step (a meta step at steps 0, n, 2n, ...)")
    meta_mode: str = option("first_order", "hypergradient: exact (second order), finite_difference (DARTS' central "
                                           "difference) or first_order")
    meta_lookahead_steps: int = option(1, "K: look-ahead steps of the Trainer's optimizer, the first on the step's "
                                          "batch, the others on batches drawn from the training part")
    meta_lr: float = option(1e-3, "learning rate of the outer optimizer on the modulators rho")
    meta_optimizer: str = option("adam", "outer optimizer on rho: adam, shared_adam or sgd")
    fd_epsilon: float | None = option(None, "finite_difference's step along c_k; null: 0.01 / ||c_k||")
    seed: int | None = option(None, "seed of the meta set and of the meta and look-ahead batches; null: "
                                    "TrainingArguments.seed")

    def __post_init__(self) -> None:
        if not (isinstance(self.meta_ratio, float) and 0.0 < self.meta_ratio < 1.0):
            raise ValueError(f"meta_ratio must be a float in (0, 1), got {self.meta_ratio!r}")
        for name in ("meta_interval", "meta_lookahead_steps", "meta_batch_size"):
            value = getattr(self, name)
            if not (value is None and name == "meta_batch_size") and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.meta_mode not in MODES:
            raise ValueError(f"meta_mode must be one of {MODES}, got {self.meta_mode!r}")
        if self.meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(f"meta_optimizer must be one of {META_OPTIMIZERS}, got {self.meta_optimizer!r}")
        if not (isinstance(self.meta_lr, (int, float)) and self.meta_lr > 0):
            raise ValueError(f"meta_lr must be > 0, got {self.meta_lr!r}")


def carve_meta_set(dataset, ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, meta indices) of a map-style ``dataset`` of n samples: ``max(1, round(ratio * n))`` drawn
    at random (seeded by ``seed``) for the meta set, the rest for training; both sorted int64 (n_train,), (n_meta,)."""
    n = len(dataset)
    if n < 2:
        raise ValueError(f"train_dataset has {n} samples; carving a meta set needs at least 2")
    count = min(n - 1, max(1, round(ratio * n)))
    order = torch.randperm(n, generator=generator_for(seed, META_SET, 0))
    return order[count:].sort().values, order[:count].sort().values


def subset(dataset, indices: torch.Tensor):
    """``dataset`` restricted to ``indices``: ``datasets.Dataset.select`` where it exists (keeps the columns the
    Trainer inspects), else ``torch.utils.data.Subset``."""
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        return dataset.select(indices.tolist())
    return Subset(dataset, indices.tolist())


@contextlib.contextmanager
def modulators_trainable(rho: list[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` on for the modulators inside the block (the hypergradient differentiates them), off after."""
    for p in rho:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in rho:
            p.requires_grad_(False)


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` wrappers."""
    while not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def gamma_logs(model: nn.Module) -> dict[str, float]:
    """``{"gamma/<module>": gamma}`` for every metapeft module (``gamma/<module>/<j>`` per segment when S > 1); a
    per-channel gamma (``gamma="channel"``) as its mean over the channels, its standard deviation as
    ``gamma_std/<module>``."""
    logs = {}
    for name, module in peft_modules(model):
        gamma = module.gamma.detach().float()
        if getattr(module, "granularity", "scalar") == "channel":
            logs[f"gamma/{name}"] = gamma.mean().item()
            logs[f"gamma_std/{name}"] = gamma.std(correction=0).item()
            continue
        gammas = gamma.cpu().tolist()
        if len(gammas) == 1:
            logs[f"gamma/{name}"] = gammas[0]
        else:
            logs.update({f"gamma/{name}/{j}": g for j, g in enumerate(gammas)})
    return logs


class StepBatch(NamedTuple):
    """An optimizer step's micro-batches (prepared input dicts) and the Trainer's ``num_items_in_batch`` over them."""

    micro_batches: list
    num_items: torch.Tensor | int | None


class HFMetaPEFTTrainer(transformers.Trainer):
    """``transformers.Trainer`` with MetaPEFT's meta steps (module docstring).

    Args:
        model: a model with metapeft modules (e.g. ``metapeft.inject(model, target_modules=("q_proj", "v_proj"))``).
        args: the Trainer's ``TrainingArguments``.
        train_dataset: the training data; the meta set is carved from it unless ``meta_dataset`` is given.
        meta_args: :class:`MetaArguments` (default settings when None).
        meta_dataset: a separate meta set (then all of ``train_dataset`` trains).
        **kwargs: every other ``transformers.Trainer`` argument (data_collator, eval_dataset, callbacks, ...).

    Attributes: ``meta_dataset``, ``meta_optimizer`` (the outer optimizer on rho), ``outer_step`` (meta steps
    taken), ``last_meta_loss``.
    """

    def __init__(self, model: nn.Module, args: transformers.TrainingArguments, train_dataset, *,
                 meta_args: MetaArguments | None = None, meta_dataset=None, **kwargs) -> None:
        self.meta_args = MetaArguments() if meta_args is None else meta_args
        self.rho = meta_parameters(model)
        if not self.rho:
            raise ValueError("model has no learnable modulators: inject metapeft modules with meta=True first "
                             "(metapeft.inject(model, target_modules=...))")
        self.meta_seed = args.seed if self.meta_args.seed is None else self.meta_args.seed
        if meta_dataset is None:
            train_indices, meta_indices = carve_meta_set(train_dataset, self.meta_args.meta_ratio, self.meta_seed)
            train_dataset, meta_dataset = subset(train_dataset, train_indices), subset(train_dataset, meta_indices)
        self.meta_dataset = meta_dataset
        for p in self.rho:
            p.requires_grad_(False)  # out of the Trainer's optimizer, backward and clipping
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        if self.args.world_size > 1:
            raise ValueError(f"HFMetaPEFTTrainer runs in one process; got world_size={self.args.world_size}")
        self.meta_optimizer = meta_optimizer(self.meta_args.meta_optimizer, self.rho, self.meta_args.meta_lr)
        self.outer_step = 0
        self.last_meta_loss: float | None = None
        self._meta_done_at: int | None = None
        self._meta_collator = None
        self._step_batch: StepBatch | None = None

    def _collate(self, dataset, indices: torch.Tensor) -> dict:
        """The samples ``dataset[indices]`` collated as the Trainer collates a training batch, on its device."""
        if self._meta_collator is None:
            self._meta_collator = self._get_collator_with_removed_columns(self.data_collator, "meta")
        return self._prepare_inputs(self._meta_collator([dataset[int(i)] for i in indices]))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The Trainer's micro-batches of the next optimizer step, also kept for its meta step."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batch = StepBatch(batch_samples, num_items)
        return batch_samples, num_items

    def _step_loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The loss whose gradient the Trainer accumulates over a :class:`StepBatch` (each micro-batch's loss scaled
        as ``Trainer.training_step`` scales it), or ``compute_loss`` of one input dict."""
        if not isinstance(batch, StepBatch):
            return self.compute_loss(model, dict(batch))
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and batch.num_items is not None) or \
                self.compute_loss_func is not None
        losses = [self.compute_loss(model, dict(micro), num_items_in_batch=batch.num_items)
                  for micro in batch.micro_batches]
        total = sum(losses)
        return total if scaled else total / len(losses)

    def meta_step(self, model: nn.Module, step_batch: StepBatch) -> torch.Tensor:
        """One meta step with ``step_batch`` (the optimizer step's micro-batches) as look-ahead step 1: the
        hypergradient through the Trainer's optimizer, then the outer optimizer's step on rho. Returns the meta loss
        (0-d, detached)."""
        meta = self.meta_args
        model = unwrap_model(model)
        step_size = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        size = meta.meta_batch_size or self.args.per_device_train_batch_size
        meta_indices = uniform_batch(torch.arange(len(self.meta_dataset)), size,
                                     generator_for(self.meta_seed, META_BATCH, self.outer_step))
        extra = lookahead_batches(torch.arange(len(self.train_dataset)), torch.empty(0, dtype=torch.long),
                                  meta.meta_lookahead_steps - 1, step_size, self.meta_seed,
                                  self.outer_step) if meta.meta_lookahead_steps > 1 else []
        phi = trainable_phi(model)
        # the Trainer clips before its step: so does the look-ahead
        rule, state = inner_rule_for(torch_optimizer(self.optimizer), phi, self.args.max_grad_norm)
        model.train()
        with modulators_trainable(self.rho), self.compute_loss_context_manager():
            train = StepBatch([self._prepare_inputs(micro) for micro in step_batch.micro_batches], step_batch.num_items)
            result = hypergradient(model, self._step_loss, train, self._collate(self.meta_dataset, meta_indices),
                                   mode=meta.meta_mode, fd_epsilon=meta.fd_epsilon, inner_rule=rule,
                                   inner_state=state,
                                   lookahead_batches=[self._collate(self.train_dataset, b) for b in extra])
        for p, g in zip(self.rho, result.meta_grads):
            p.grad = g.to(p.dtype)
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.outer_step += 1
        return result.val_loss

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step on a micro-batch, after a meta step on the whole optimizer step's batch before the first
        micro-batch of every ``meta_interval``-th optimizer step."""
        step = self.state.global_step
        if step % self.meta_args.meta_interval == 0 and self._meta_done_at != step:
            self._meta_done_at = step
            step_batch = self._step_batch
            if step_batch is None or step_batch.micro_batches[0] is not inputs:  # called outside the Trainer's loop
                step_batch = StepBatch([inputs], num_items_in_batch)
            self.last_meta_loss = float(self.meta_step(model, step_batch))
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's optimizer and scheduler files, then :data:`META_STATE_NAME` beside them."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_checkpoint({"meta_optimizer": self.meta_optimizer.state_dict(), "outer_step": self.outer_step},
                            Path(output_dir) / META_STATE_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's optimizer and scheduler states, then the outer optimizer's and the outer-step count from
        the checkpoint's :data:`META_STATE_NAME`."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = Path(checkpoint) / META_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"resume_from_checkpoint: {path} is missing: the checkpoint was not written by "
                                    "HFMetaPEFTTrainer, so the outer optimizer's state and the meta-step count "
                                    "cannot be restored")
        state = load_checkpoint(path)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.outer_step = int(state["outer_step"])

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log, each record with every ``gamma/<module>`` and the last ``meta_loss``."""
        logs.update(gamma_logs(self.model))
        if self.last_meta_loss is not None:
            logs["meta_loss"] = self.last_meta_loss
        super().log(logs, *args, **kwargs)
