"""``MetaPEFTTrainer``: wires model, data, step and run files together and runs the epoch loop.

The parts live beside this module: the config (:mod:`~metapeft.trainer.config`), the step and its optimizers
(:mod:`~metapeft.trainer.step`), the run directory's files (:mod:`~metapeft.trainer.output_dir`), device and head
setup (:mod:`~metapeft.trainer.model_setup`), evaluation passes (:mod:`~metapeft.trainer.evaluation`), callbacks
(:mod:`~metapeft.trainer.callbacks`) and torch.distributed plumbing (:mod:`~metapeft.trainer.distributed`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from metapeft.atomic_files import copy_into, load_checkpoint, rng_state, seed_everything, set_rng_state
from metapeft.data.sampling import MetaSetSampler, MetaStepSamples, dataset_labels, epoch_batches
from metapeft.data.seeded import SeededSamples
from metapeft.data.shards import Shards
from metapeft.heads import CosineClassifier, find_head
from metapeft.inject import unwrap_model
from metapeft.layers.base import MetaPEFTModule
from metapeft.losses import LogitAdjustedLoss
from metapeft.meta.fsdp import fsdp_modules, gather_full, gathered
from metapeft.metrics import class_split_from_counts, metrics_from_confusion
from metapeft.params import meta_parameters, trainable_phi
from metapeft.runs.lock import RunClaim, claim_run_directory
from metapeft.trainer.callbacks import Callback
from metapeft.trainer.config import RUN_CONTROL_FIELDS, TrainerConfig
from metapeft.trainer.distributed import (
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_from_rank0,
    check_ranks_agree,
    rank_and_world_size,
)
from metapeft.trainer.evaluation import class_feature_sums, confusion_counts
from metapeft.trainer.fsdp import check_fsdp, shard_model, sharded_like, sharded_optimizer_state
from metapeft.trainer.gamma_range import GammaRangeWatch
from metapeft.trainer.model_setup import (
    autocast_context,
    head_to_replace,
    install_head,
    parameter_dtype,
    resolve_device,
    select_trainable,
    training_forward,
)
from metapeft.trainer.nonfinite import NonFiniteError
from metapeft.trainer.output_dir import (
    LOG_NAME,
    RunFiles,
    check_optimizer_state,
    check_same_config,
    check_same_run,
    check_trained_tensors,
    run_fingerprint,
    trained_tensors,
)
from metapeft.trainer.step import BilevelStep, TrainingLoss


class MetaPEFTTrainer:
    """Trains a classifier with MetaPEFT modules by the paper's bi-level recipe (:mod:`metapeft.trainer.step`).

    Args:
        model: an ``nn.Module`` mapping images (B, ...) to logits (B, C) through a classifier head module
            (timm's ``get_classifier()``, or an attribute ``head``/``fc``/``classifier``, or ``config.head``).
            With ``classifier="cosine"`` that head is replaced by a :class:`~metapeft.heads.CosineClassifier`
            initialised from class-mean features of the training set. Contains metapeft modules
            (``metapeft.FusedMetaLoRA``, ...); with ``freeze_backbone`` everything but PEFT weights, modulators
            and the head is frozen.
        train_set: map-style dataset of ``(image tensor, int label)``; a ``targets`` list/array is used if present.
        val_set: optional dataset of the same form, used as the meta-batch source instead of the training set.
        head_init_set: the training set under the test transform (un-augmented; same samples and labels in the
            same order, e.g. :attr:`metapeft.data.DataBundle.train_eval`), read for the cosine head's class-mean
            initialisation; default ``train_set`` (whose augmented images give noisier means).
        config: :class:`TrainerConfig` (default: the paper's recipe).
        callbacks: observers of :meth:`fit` (:mod:`metapeft.trainer.callbacks`), called in this order.

    Stopping: :meth:`request_stop` (from any thread or a signal handler) ends :meth:`fit` at the next step
    boundary with a checkpoint that resumes exactly (``resume=True``).

    Parts (public attributes): ``step`` (:class:`~metapeft.trainer.step.BilevelStep`: the optimizers, the step),
    ``files`` (:class:`~metapeft.trainer.output_dir.RunFiles`: the run directory's files), ``meta_sampler``,
    ``phi`` / ``rho`` (inner / outer parameters), ``head``; position ``epoch``, ``step_in_epoch``, ``global_step``,
    ``outer_step``.

    Distributed: when a default process group is initialised (``torchrun``; gloo on CPU, nccl on GPU) every
    rank sees the same global batch order and splits each batch (:mod:`metapeft.trainer.step`); the result
    equals single-process training on the same global batch up to rounding (dropout 0). The ranks must agree on
    the config, the datasets and the model (checked at construction, an error names what differs); checkpoints
    resume on any world size. With ``fsdp=True`` (or a model ``fully_shard`` was applied to) the parameters are
    sharded by FSDP2 (:mod:`metapeft.trainer.fsdp`).
    """

    def __init__(self, model: nn.Module, train_set, val_set=None, config: TrainerConfig | None = None,
                 callbacks: Sequence[Callback] = (), head_init_set=None) -> None:
        self.config = config = config or TrainerConfig()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.callbacks = list(callbacks)
        self.rank, self.world_size = rank_and_world_size()
        self.device = resolve_device(config.device)
        self.train_set, self.val_set = train_set, val_set
        self.train_labels = dataset_labels(train_set)
        if self.train_labels.numel() == 0:
            raise ValueError("train_set is empty")
        self.val_labels = None if val_set is None else dataset_labels(val_set)
        self.head_init_set = train_set if head_init_set is None else head_init_set
        if head_init_set is not None and not torch.equal(dataset_labels(head_init_set), self.train_labels):
            raise ValueError("head_init_set must hold train_set's samples with the same labels in the same order "
                             "(the training images under the test transform)")
        self.model, self.module = training_forward(model), unwrap_model(model)
        model = self.module
        self.fsdp = check_fsdp(model, config.fsdp, self.world_size, self.device)
        presharded = bool(fsdp_modules(model))
        self.param_dtype = parameter_dtype(model)
        self.num_classes = self._count_classes()
        if presharded and (name := head_to_replace(model, config, self.num_classes)) is not None:
            raise ValueError(f"the model is already sharded by fully_shard and the trainer would replace its head "
                             f"{name!r} (classifier={config.classifier!r}, {self.num_classes} classes): pass the "
                             f"unsharded model with fsdp=True (the trainer shards it after setting the head), or "
                             f"shard a model that has the head the config asks for")
        self.head_name = install_head(model, config, self.num_classes)
        self.head = model.get_submodule(self.head_name)
        if not presharded:  # a sharded model lives on its mesh's device (check_fsdp)
            model.to(self.device)
        self.rho = select_trainable(model, self.head, config)
        self.phi = trainable_phi(model)
        if not self.phi:
            raise ValueError("the model has no trainable PEFT weights or head parameters")
        check_ranks_agree(self._facts_every_rank_shares(), self.world_size)
        if not presharded:  # a sharded model's ranks hold different rows
            broadcast_from_rank0(model, self.world_size)
        if self.fsdp and not presharded:
            shard_model(model, self.device, self.world_size)
            self.rho, self.phi = meta_parameters(model) if self.rho else [], trainable_phi(model)

        counts = torch.bincount(self.train_labels, minlength=self.num_classes)
        self.class_split = class_split_from_counts(counts) if config.class_split == "from_counts" \
            else config.class_split
        self.autocast = functools.partial(autocast_context, self.device, config.amp)
        self.criterion = LogitAdjustedLoss(counts, config.tau if config.loss == "logit_adjusted" else 0.0)
        self.criterion.to(self.device)
        self.loss_fn = TrainingLoss(self.criterion, self.autocast)
        self.meta_sampler = self._meta_sampler()
        self.train_indices = self.meta_sampler.train_indices() if self.meta_sampler and val_set is None else \
            torch.arange(self.train_labels.numel())
        self.steps_per_epoch = math.ceil(self.train_indices.numel() / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.shards = Shards(self.rank, self.world_size, self.device, self.param_dtype, config.num_workers)
        samples = None if self.meta_sampler is None else MetaStepSamples(
            train_set, self.train_indices, train_set if val_set is None else val_set, self.meta_sampler, config.seed,
            config.batch_size)
        self.step = BilevelStep(self.model, self.phi, self.rho, self.loss_fn, config, samples, self.shards,
                                self.total_steps, fsdp=self.fsdp)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.output_dir = None if config.output_dir is None else Path(config.output_dir)
        self.files = RunFiles(self.output_dir, self.rank)
        self._stop_requested = False
        self.gamma_watch = GammaRangeWatch()
        self._eval_pending = False  # an epoch's evaluation is due (its checkpoint is written before it)
        self._fingerprint: dict | None = None

    def _facts_every_rank_shares(self) -> dict[str, object]:
        """What must be equal on every rank (:func:`~metapeft.trainer.distributed.check_ranks_agree`): the config
        (but the run-control fields), the datasets' sizes and labels, the model's tensors and its modulators."""
        config = self.config.to_dict()
        facts = {f"config.{name}": value for name, value in config.items() if name not in RUN_CONTROL_FIELDS}

        def digest(values) -> str:
            return hashlib.sha256(repr(values).encode()).hexdigest()[:16]

        facts.update({
            "train_set length": len(self.train_set), "train_set labels": digest(self.train_labels.tolist()),
            "val_set length": None if self.val_set is None else len(self.val_set),
            "val_set labels": None if self.val_labels is None else digest(self.val_labels.tolist()),
            "modulators": len(self.rho), "trainable parameters": len(self.phi), "fsdp": self.fsdp,
            "model tensors": digest([(name, tuple(t.shape), str(t.dtype))
                                     for name, t in self.module.state_dict().items()]),
        })
        return facts

    def _count_classes(self) -> int:
        """``config.num_classes``, which every label must be below; without it the largest label seen (training or
        validation set) + 1, at least the old head's width."""
        declared = self.config.num_classes
        if declared is not None:
            for name, labels in (("train_set", self.train_labels), ("val_set", self.val_labels)):
                if labels is not None and labels.numel() and int(labels.max()) >= declared:
                    raise ValueError(f"{name} has label {int(labels.max())}, but num_classes is {declared}: labels "
                                     f"must lie in [0, {declared})")
            return declared
        labels_max = int(self.train_labels.max())
        if self.val_labels is not None and self.val_labels.numel():
            labels_max = max(labels_max, int(self.val_labels.max()))
        old_head = self.module.get_submodule(find_head(self.module, self.config.head))
        return max(labels_max + 1, getattr(old_head, "out_features", 0) or 0)

    def _check_batch_leaves_a_meta_set(self) -> None:
        """Refuse, before ``fit`` claims a directory or takes a step, a ``batch_size`` that leaves no training sample
        outside a full batch for the re-sampled meta set (every meta step would fail with "the re-sampled meta set is
        empty"), naming a batch size that works."""
        config = self.config
        if self.meta_sampler is None or self.val_set is not None or not config.meta_resample:
            return
        n = self.train_labels.numel()
        if n - config.batch_size >= 2:
            return
        classes = int((torch.bincount(self.train_labels) > 0).sum())
        works = n - classes - 1  # then a full batch leaves classes + 1 samples: one class has two (pigeonhole)
        advice = f"use batch_size <= {works} (train.batch_size={works}), " if works >= 1 else ""
        raise ValueError(f"batch_size {config.batch_size} is too large for the training set of {n} samples: each meta "
                         f"step draws its meta set (meta_ratio {config.meta_ratio}) from the training samples outside "
                         f"the step's batch, which needs a class with 2 samples left over; {advice}or set "
                         "meta_resample=False (a fixed meta split), or pass a val_set")

    def _meta_sampler(self) -> MetaSetSampler | None:
        if not self.rho:
            return None
        config = self.config
        meta_batch_size = config.meta_batch_size or config.batch_size
        if meta_batch_size < self.world_size:
            raise ValueError(f"meta_batch_size ({meta_batch_size}) must be >= the world size ({self.world_size})")
        source = self.train_labels if self.val_set is None else self.val_labels
        return MetaSetSampler(source, config.meta_ratio, meta_batch_size, config.seed, config.meta_resample,
                              separate_source=self.val_set is not None, sampling=config.meta_sampling)

    # ----- the optimizers and counters of the step, as attributes of the trainer -----------------------
    @property
    def optimizer(self) -> torch.optim.SGD:
        """The inner SGD optimizer over phi."""
        return self.step.optimizer

    @property
    def meta_optimizer(self) -> torch.optim.Adam | None:
        """The outer Adam optimizer over rho (None without meta-learning)."""
        return self.step.meta_optimizer

    @property
    def scheduler(self):
        """The inner learning-rate schedule (None for ``schedule="constant"``)."""
        return self.step.scheduler

    @property
    def outer_step(self) -> int:
        """Meta steps taken so far."""
        return self.step.outer_step

    # ----- stepping, stopping ----------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, batch_indices: torch.Tensor) -> dict:
        """One global step on the global batch (x, y) (training-set indices ``batch_indices``), each rank computing
        on its shard; returns the step's values (``lr``, ``train_loss``, and ``meta_loss`` / ``grad_norm`` when
        computed)."""
        start, stop = self.shards.bounds(len(y))
        return self._train_shard(x[start:stop], y[start:stop], batch_indices)

    def _train_shard(self, x: torch.Tensor, y: torch.Tensor, batch_indices: torch.Tensor) -> dict:
        """:meth:`train_step` given this rank's shard (x, y) of the global batch ``batch_indices``."""
        self.model.train()
        return self.step(x, y, batch_indices, self.global_step)

    def request_stop(self) -> None:
        """Ask :meth:`fit` to stop at the next step boundary, writing a resumable checkpoint (with ``output_dir``).

        Safe from any thread and from a signal handler: it only sets a flag, which the training thread reads
        between steps (in a process group every rank stops at the same step: the next ``log_every`` boundary after
        any rank was asked). The request is consumed when ``fit`` returns; one made before ``fit`` stops it before its
        first step."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was requested and ``fit`` has not yet ended on it."""
        return self._stop_requested

    def _emit(self, event: str, *payload) -> None:
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                method(self, *payload)

    # ----- the loop ---------------------------------------------------------------------------------------
    def _begin(self) -> None:
        """Resume from ``output_dir``'s checkpoint (``resume=True``), or seed and initialise a fresh run."""
        if self.config.resume and self.files.has_checkpoint():
            self.load_state(self.files.checkpoint)
        elif self.global_step == 0:
            seed_everything(self.config.seed)
            if isinstance(self.head, CosineClassifier):
                self.init_head_from_class_means()
            self.files.truncate_log(0)

    def _stop_now(self) -> bool:
        """Whether to stop before the next step. Several ranks agree (one tiny all-reduce and a host read) only at
        log boundaries, where the trainer reads the step's values anyway, so a step costs no extra device sync."""
        if self.world_size > 1 and self.global_step % self.config.log_every != 0:
            return False
        return any_rank(self._stop_requested, self.device, self.world_size)

    def _end(self, result: dict) -> dict:
        self._stop_requested = False
        self._emit("on_fit_end", result)
        return result

    def fit(self, eval_set=None, max_steps: int | None = None) -> dict:
        """Train to ``config.epochs`` epochs (resuming from ``output_dir`` when ``config.resume``).

        ``eval_set``: evaluated (and logged) after every epoch, once the epoch's checkpoint is written (a resume from
        that checkpoint evaluates first). ``max_steps``: stop (with a checkpoint, if
        ``output_dir`` is set) once ``global_step`` reaches it, e.g. mid-epoch. A :meth:`request_stop` ends the
        loop at the next step boundary the same way. Returns the last evaluation's metrics (empty without
        ``eval_set``) plus ``global_step``, ``epoch`` and ``stopped`` (True when a stop request ended it).

        ``output_dir`` is claimed for the call (:func:`metapeft.runs.lock.claim_run_directory`: a second run on
        it fails at once; a new run refuses an old one unless ``resume`` or ``overwrite``; a later ``fit`` of the
        same trainer continues its own run; a log alone, left by a run that stopped before its first checkpoint, is
        no old run). Non-finite values raise :class:`~metapeft.trainer.nonfinite.NonFiniteError` naming the cause and
        the step, before that state is logged or written.
        """
        self._check_batch_leaves_a_meta_set()
        claim = self._claim_output_dir()
        try:
            try:
                return self._fit(eval_set, max_steps)
            except NonFiniteError:
                raise
            except Exception as error:
                self.step.monitor.raise_if_bad(error)  # a NaN modulator stops the next forward: name the first cause
                raise
        except NonFiniteError as error:
            raise self._locate_nonfinite_input(error) from error.__cause__
        finally:
            if claim is not None:
                claim.release()

    def _locate_nonfinite_input(self, error: NonFiniteError) -> NonFiniteError:
        """``error`` with the first non-finite training sample of its step named, when its cause is the input batch
        (the samples are read again; with none found, the step's meta batch held it)."""
        if error.cause != "input batch" or error.detail:
            return error
        epoch, position = divmod(error.global_step - 1, self.steps_per_epoch)
        batch = epoch_batches(self.train_indices, self.config.batch_size, self.config.seed, epoch)[position]
        samples = SeededSamples(self.train_set, self.config.seed, epoch)
        bad = next((int(i) for i in batch.tolist()
                    if not torch.isfinite(torch.as_tensor(samples[int(i)][0], dtype=torch.float64)).all()), None)
        detail = f"train_set sample {bad}, in batch {position} of epoch {epoch}" if bad is not None else \
            "a sample of the step's meta batch; its training batch is finite"
        return NonFiniteError(error.cause, error.global_step, detail)

    def _claim_output_dir(self) -> RunClaim | None:
        if self.output_dir is None or self.rank != 0:
            return None
        continuing = self.global_step > 0
        return claim_run_directory(self.output_dir, resume=self.config.resume or continuing,
                                   overwrite=self.config.overwrite and not continuing, disposable=(LOG_NAME,))

    def _fit(self, eval_set, max_steps: int | None) -> dict:
        config = self.config
        self._begin()
        self._emit("on_fit_start")
        metrics = self._evaluate_pending(eval_set)
        while self.epoch < config.epochs:
            batches = epoch_batches(self.train_indices, config.batch_size, config.seed, self.epoch)
            remaining = batches[self.step_in_epoch:]
            loader = iter(self.shards.epoch_loader(self.train_set, remaining, config.seed, self.epoch))
            bar = tqdm(total=len(batches), initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{config.epochs}",
                       disable=not config.progress or self.rank != 0, leave=False)
            for batch_indices in remaining:
                if self._stop_now():
                    bar.close()
                    self._checkpoint("stop")
                    return self._end({"global_step": self.global_step, "epoch": self.epoch, "stopped": True})
                logs = self._train_shard(*self.shards.local(next(loader), batch_indices), batch_indices)
                self.step_in_epoch += 1
                self.global_step += 1
                bar.update(1)
                self._after_step(bar, logs, len(batch_indices))
                if max_steps is not None and self.global_step >= max_steps:
                    bar.close()
                    self._checkpoint("max_steps")
                    return self._end({"global_step": self.global_step, "epoch": self.epoch, "stopped": False})
            bar.close()
            self.epoch += 1
            self.step_in_epoch = 0
            gammas = self.gammas()
            position = {"epoch": self.epoch, "global_step": self.global_step}
            self._log_and_emit("on_epoch_end", {"event": "epoch", **position, "gammas": gammas})
            self._watch_gammas(position, gammas)
            self._eval_pending = eval_set is not None
            self._checkpoint("epoch")  # before evaluating: an evaluation that fails loses no training
            metrics = self._evaluate_pending(eval_set) or metrics
        self.export_weights()
        return self._end({**metrics, "global_step": self.global_step, "epoch": self.epoch, "stopped": False})

    def _evaluate_pending(self, eval_set) -> dict:
        """Evaluate on ``eval_set`` and log it when an epoch's evaluation is due (also after resuming from that
        epoch's checkpoint, written before it); the metrics, or {} when none was due."""
        if not self._eval_pending or eval_set is None:
            return {}
        metrics = self.evaluate(eval_set)
        self._eval_pending = False
        self._log_and_emit("on_evaluate", {"event": "eval", "epoch": self.epoch, "global_step": self.global_step,
                                           **metrics})
        return metrics

    def _watch_gammas(self, position: dict, gammas: dict[str, list[float]] | None = None) -> None:
        """Warn about and log (rank 0) modules whose gamma (default: read now) left the sane range
        (:mod:`~metapeft.trainer.gamma_range`)."""
        if gammas is None and self.fsdp:  # reading them is a collective
            gammas = self.gammas()
        if self.rank != 0:
            return
        record = self.gamma_watch.check(self.gammas() if gammas is None else gammas, position)
        if record is not None:
            self.log(record)

    def _after_step(self, bar, logs: dict, batch_size: int) -> None:
        """Check finiteness (every step on the CPU, where it costs no sync; at log boundaries elsewhere), log every
        ``log_every`` steps (with a gamma range check), tell the callbacks, write the ``save_every_steps``
        checkpoint."""
        position = {"event": "step", "epoch": self.epoch, "global_step": self.global_step}
        logging = self.global_step % self.config.log_every == 0
        if logging or self.device.type == "cpu":
            self.step.monitor.raise_if_bad()
        if logging:
            record = {k: float(v) for k, v in logs.items()}
            bar.set_postfix(loss=f"{record['train_loss']:.4f}")
            self.log({**position, **record})
            self._watch_gammas({"epoch": self.epoch, "global_step": self.global_step})
        self._emit("on_step_end", {**position, "step_in_epoch": self.step_in_epoch, "batch_size": batch_size,
                                   **logs})
        if self.config.save_every_steps and self.global_step % self.config.save_every_steps == 0:
            self._checkpoint("interval")

    def _log_and_emit(self, event: str, record: dict) -> None:
        self.log(record)
        self._emit(event, record)

    def _checkpoint(self, reason: str) -> None:
        self.step.monitor.raise_if_bad()
        self.save_state()
        if self.output_dir is not None:
            self._emit("on_checkpoint", {"path": self.files.checkpoint, "reason": reason, "epoch": self.epoch,
                                         "step_in_epoch": self.step_in_epoch, "global_step": self.global_step})

    # ----- evaluation, head initialisation, gammas --------------------------------------------------------
    def full_model(self) -> contextlib.AbstractContextManager:
        """Under FSDP2, a block in which the model holds its full parameters (:func:`metapeft.meta.fsdp.gathered`:
        every rank enters it together; what is written to the parameters inside is lost on exit); otherwise a
        no-op. Evaluation, the head's initialisation and what is saved run inside."""
        return gathered(self.module) if self.fsdp else contextlib.nullcontext()

    def _checked_on_every_rank(self, run):
        """``run()``, a pass over this rank's shard; when its data checks fail (``ValueError``) on any rank, every
        rank raises (the failing one its own error), so no rank waits forever in the all-reduce that follows."""
        try:
            result, error = run(), None
        except ValueError as caught:
            result, error = None, caught
        if any_rank(error is not None, self.device, self.world_size):
            raise error or ValueError("another rank's shard failed its data checks (its error names the sample)")
        return result

    @torch.no_grad()
    def init_head_from_class_means(self) -> None:
        """Set the cosine head's prototypes to the class-mean features (the head's inputs) over the training images
        of ``head_init_set``. Each rank embeds a contiguous shard; sums and counts are all-reduced."""
        loader, first = self.shards.dataset_loader(self.head_init_set, self.config.batch_size)
        what = "train_set" if self.head_init_set is self.train_set else "head_init_set"
        with self.full_model():
            sums, counts = self._checked_on_every_rank(lambda: class_feature_sums(
                self.module, self.head, loader, self.num_classes, self.device, self.param_dtype, self.autocast,
                what=what, first_index=first))
            sums, counts = all_reduce_sum([sums, counts], self.world_size)
            self.head.init_from_class_means(sums, counts)
            head = {name: t.clone() for name, t in self.head.state_dict().items()} if self.fsdp else None
        if head is not None:  # written to the gathered copy, which the block does not keep: into the head's shards
            copy_into(self.head.state_dict(), sharded_like(head, self.head.state_dict()))

    @torch.no_grad()
    def evaluate(self, dataset) -> dict:
        """Metrics (``metapeft.metrics``) of the model's predictions (raw logits, no logit adjustment) on
        ``dataset``, with ``config.class_split`` groups. Ranks evaluate shards and sum confusion matrices. A label
        outside ``[0, num_classes)``, a non-finite image or non-finite logits raise a ``ValueError`` naming the
        sample's index in ``dataset``."""
        loader, first = self.shards.dataset_loader(dataset, self.config.batch_size)
        with self.full_model():  # FSDP2: no collective per forward, so ranks may run different numbers of batches
            cm = self._checked_on_every_rank(lambda: confusion_counts(
                self.model, loader, self.num_classes, self.device, self.param_dtype, self.autocast, what="eval_set",
                first_index=first))
        (cm,) = all_reduce_sum([cm], self.world_size)
        return metrics_from_confusion(cm.cpu(), self.class_split)

    def gammas(self) -> dict[str, list[float]]:
        """Every metapeft module's gamma, by module name (one host read for all of them; under FSDP2 a collective)."""
        modules = [(name, m.gamma.detach()) for name, m in self.module.named_modules() if isinstance(m, MetaPEFTModule)]
        if not modules:
            return {}
        modules = gather_full(modules)  # FSDP2: sharded gammas gathered (a collective: every rank reads them)
        values = iter(torch.cat([gamma.double() for _, gamma in modules]).tolist())
        return {name: [next(values) for _ in range(gamma.numel())] for name, gamma in modules}

    def fingerprint(self) -> dict:
        """What this trainer's checkpoints continue (:func:`~metapeft.trainer.output_dir.run_fingerprint`),
        computed once: the frozen weights do not change and the datasets are fixed."""
        if self._fingerprint is None:
            with self.full_model():
                self._fingerprint = run_fingerprint(self.module, self.config.save_full_model,
                                                    (self.train_set, self.train_labels),
                                                    (self.val_set, self.val_labels))
        return self._fingerprint

    # ----- state, checkpoints, log --------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """The saved model tensors: trainable parameters + modulators (or everything, ``save_full_model``); full
        tensors under FSDP2 (gathered on every rank)."""
        with self.full_model():
            return trained_tensors(self.module, self.config.save_full_model)

    def state_dict(self) -> dict:
        """Everything an exact resume needs: model tensors, optimizers, scheduler, RNG, loop position."""
        return {
            "model": self.model_state(),
            **gather_full(self.step.state_dict()),  # FSDP2: the optimizers' sharded buffers in full
            "rng": rng_state(),
            "position": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                         "global_step": self.global_step, "outer_step": self.outer_step,
                         "eval_pending": self._eval_pending},
            "log_offset": self.files.log_size(),
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint(),
            "gamma_warned": self.gamma_watch.state_dict(),
        }

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        """Restore :meth:`state_dict`'s output (same model construction and config; only the fields in
        ``RUN_CONTROL_FIELDS`` may differ). All or nothing: the config, the run's data and frozen weights
        (:meth:`fingerprint`), every model tensor (names, shapes, dtypes) and the optimizers' buffers are checked
        before anything changes; errors name ``source``."""
        check_same_config(state["config"], self.config.to_dict())
        check_trained_tensors(self.module, state["model"], self.config.save_full_model, source)
        for name, optimizer in (("optimizer", self.optimizer), ("meta_optimizer", self.meta_optimizer)):
            if optimizer is not None:
                check_optimizer_state(optimizer, state.get(name), name, source)
        check_same_run(state.get("fingerprint"), self.fingerprint(), source)
        for module in fsdp_modules(self.module):  # FSDP2: the sharded parameters registered, not a forward's
            module.reshard()
        targets = self.module.state_dict()
        if self.fsdp:  # full tensors into the sharded model and optimizers
            state = {**state, "model": sharded_like(state["model"], targets),
                     **{name: sharded_optimizer_state(state[name], optimizer)
                        for name, optimizer in (("optimizer", self.optimizer), ("meta_optimizer", self.meta_optimizer))
                        if optimizer is not None}}
        copy_into(targets, state["model"])
        self.step.load_state_dict(state)
        set_rng_state(state["rng"])
        position = state["position"]
        self.epoch, self.step_in_epoch = position["epoch"], position["step_in_epoch"]
        self.global_step, self.step.outer_step = position["global_step"], position["outer_step"]
        self._eval_pending = bool(position.get("eval_pending", False))
        self.gamma_watch.load_state_dict(state.get("gamma_warned", []))
        self.files.truncate_log(state["log_offset"])

    def save_state(self, path: str | os.PathLike | None = None) -> Path | None:
        """Atomically write the checkpoint (rank 0; default ``output_dir/checkpoint.pt``); None without a path."""
        if path is None and self.output_dir is None:
            return None
        written = self.files.save_checkpoint(self.state_dict(), path)
        barrier(self.world_size)
        return written

    def load_state(self, path: str | os.PathLike) -> None:
        """Resume from a checkpoint file written by :meth:`save_state` (loaded with ``weights_only=True``)."""
        self.load_state_dict(load_checkpoint(path, map_location=self.device), source=f"checkpoint {path}")

    def export_weights(self) -> Path | None:
        """Write the trained tensors (:meth:`model_state`) to ``output_dir/model.safetensors`` (rank 0)."""
        self.step.monitor.raise_if_bad()
        return self.files.export_weights(self.model_state(), {"global_step": self.global_step,
                                                              "config": json.dumps(self.config.to_dict())})

    def log(self, record: dict) -> None:
        """Append one JSON line to ``output_dir/metrics.jsonl`` (rank 0; nothing without output_dir)."""
        self.files.log(record)
