"""The MetaPEFT trainer: inner SGD on the PEFT weights and head, outer Adam on the modulators.

One training step at global step ``t`` on a global batch ``B_t`` (docs/method.md, "Bi-level optimization"):

- meta step (every ``meta_interval`` steps, when the model has learnable modulators and ``meta=True``):
  draw a stratified meta batch ``V_t`` (``metapeft.sampling``), compute the hypergradient of
  ``L_val(phi')`` with ``phi' = phi - lr * (grad_phi L_train(phi, rho; B_t) + wd * phi + mu * m)``
  (``metapeft.meta.hypergradient``), and take an Adam step on rho;
- inner step: an SGD step (momentum, weight decay, cosine schedule) on phi.

When the meta step's look-ahead is the real inner step: the look-ahead is exactly the update torch's SGD
applies (``buf = mu * buf + g + wd * phi; phi -= lr * buf``) with ``g = grad_phi L_train(phi, rho_t; B_t)``.
The trainer therefore feeds the hypergradient's ``phi_grads`` to the SGD optimizer instead of running a
second forward/backward; the result equals the look-ahead ``phi'`` (up to rounding) whenever no gradient
clipping changes ``g`` (``max_grad_norm`` unset or not reached). The inner step thus uses the modulators
rho_t from before the outer update (a simultaneous update of phi and rho). ``meta_reuse_lookahead=False``
instead recomputes the inner gradient after the outer step, with rho_{t+1} (DARTS' alternating order), at
the cost of one more forward/backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset, default_collate
from tqdm.auto import tqdm

from metapeft.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_safetensors,
    seed_everything,
    set_rng_state,
)
from metapeft.heads import CosineClassifier, find_head, head_in_features, replace_head
from metapeft.layers.base import MetaPEFTModule
from metapeft.losses import LogitAdjustedLoss
from metapeft.meta import hypergradient, trainable_phi
from metapeft.metrics import class_split_from_counts, metrics_from_confusion
from metapeft.params import mark_only_peft_trainable, meta_parameters
from metapeft.sampling import LOADER, MetaSetSampler, dataset_labels, epoch_batches, generator_for, shard_bounds

LOSSES = ("logit_adjusted", "ce")
CLASSIFIERS = ("cosine", "linear")
SCHEDULES = ("cosine", "constant")
AMP_MODES = ("auto", "bf16", "none")
META_MODES = ("exact", "finite_difference", "first_order")


@dataclass
class TrainerConfig:
    """Every knob of :class:`MetaPEFTTrainer`; the defaults are the paper's recipe (docs/method.md).

    Inner loop (phi = trainable non-modulator parameters: PEFT weights + head): SGD with ``lr``,
    ``momentum``, ``weight_decay``, a per-step ``schedule`` over ``epochs`` epochs of ``batch_size``.
    Outer loop (rho = modulators): Adam with ``meta_lr`` every ``meta_interval`` inner steps, hypergradient
    mode ``meta_mode``, meta batches of ``meta_batch_size`` (default ``batch_size``) drawn from a stratified
    ``meta_ratio`` sample of the training set, re-sampled every outer step unless ``meta_resample=False``
    (a fixed split, excluded from the inner loop's data); a ``val_set`` given to the trainer replaces the
    training set as the meta-batch source. ``meta=False`` (or a model without learnable modulators)
    trains as plain PEFT.

    Loss ``"logit_adjusted"`` (tau) or ``"ce"``; ``classifier="cosine"`` replaces the head (found by name
    ``head`` or automatically) with a cosine classifier of scale ``cosine_scale`` initialised from class-mean
    features, ``"linear"`` keeps it (resized if its width is not the number of classes). ``amp``: bf16
    autocast on CUDA (``"auto"``), everywhere (``"bf16"``) or never. ``output_dir`` receives
    ``checkpoint.pt`` (each epoch, every ``save_every_steps`` steps and on an early stop), ``metrics.jsonl``
    and the final ``model.safetensors``; ``resume=True`` continues from its checkpoint when one exists.
    ``class_split`` names class groups for the metrics (e.g. ``{"head": [...], "tail": [...]}``), or
    ``"from_counts"`` for many/medium/few by training-set counts (> 100, 20-100, < 20).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    max_grad_norm: float | None = None

    meta: bool = True
    meta_lr: float = 1e-3
    meta_interval: int = 1
    meta_mode: str = "exact"
    meta_ratio: float = 0.2
    meta_resample: bool = True
    meta_batch_size: int | None = None
    meta_reuse_lookahead: bool = True

    loss: str = "logit_adjusted"
    tau: float = 1.0
    classifier: str = "cosine"
    cosine_scale: float = 25.0
    head: str | None = None
    freeze_backbone: bool = True

    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    log_every: int = 10

    output_dir: str | None = None
    save_every_steps: int | None = None
    save_full_model: bool = False
    resume: bool = False
    class_split: dict[str, list[int]] | str | None = field(default=None)

    def __post_init__(self) -> None:
        positive_ints = ("epochs", "batch_size", "meta_interval", "log_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("meta_batch_size", "save_every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        for name in ("lr", "meta_lr", "cosine_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay", "tau"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.meta_ratio < 1.0:
            raise ValueError(f"meta_ratio must be in (0, 1), got {self.meta_ratio!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be None or > 0, got {self.max_grad_norm!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers!r}")
        for name, allowed in (("loss", LOSSES), ("classifier", CLASSIFIERS), ("schedule", SCHEDULES),
                              ("amp", AMP_MODES), ("meta_mode", META_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.class_split, str) and self.class_split != "from_counts":
            raise ValueError(f"class_split must be a dict, 'from_counts' or None, got {self.class_split!r}")
        if self.resume and self.output_dir is None:
            raise ValueError("resume=True needs output_dir (where the checkpoint lives)")

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return dataclasses.asdict(self)


CHECKPOINT_NAME, LOG_NAME, WEIGHTS_NAME = "checkpoint.pt", "metrics.jsonl", "model.safetensors"
# config fields a resumed run may change: they do not alter the training trajectory
RUN_CONTROL_FIELDS = ("resume", "progress", "num_workers", "log_every", "save_every_steps", "output_dir", "device")


def _json_safe(value):
    """NaN/inf floats -> None, recursively, so every log line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def setup_distributed(backend: str = "auto") -> tuple[int, int]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``) when ``WORLD_SIZE > 1`` and no group exists yet: ``"auto"`` picks nccl
    (and device ``cuda:LOCAL_RANK``) with CUDA, gloo without. Returns (rank, world_size); (0, 1) alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(("nccl" if torch.cuda.is_available() else "gloo") if backend == "auto" else backend)
    return _distributed()


def _distributed() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MetaPEFTTrainer:
    """Trains a classifier with MetaPEFT modules by the paper's bi-level recipe (module docstring).

    Args:
        model: an ``nn.Module`` mapping images (B, ...) to logits (B, C) through a classifier head module
            (timm's ``get_classifier()``, or an attribute ``head``/``fc``/``classifier``, or ``config.head``).
            With ``classifier="cosine"`` that head is replaced by a :class:`~metapeft.heads.CosineClassifier`
            initialised from class-mean features of the training set. Contains metapeft modules
            (``metapeft.FusedMetaLoRA``, ...); with ``freeze_backbone`` everything but PEFT weights, modulators
            and the head is frozen.
        train_set: map-style dataset of ``(image tensor, int label)``; a ``targets`` list/array is used if present.
        val_set: optional dataset of the same form, used as the meta-batch source instead of the training set.
        config: :class:`TrainerConfig` (default: the paper's recipe).

    Distributed: when a default process group is initialised (``torchrun``; gloo on CPU, nccl on GPU) every
    rank sees the same global batch order. Plain inner steps split the global batch across ranks and
    all-reduce the gradients. A meta step computes the look-ahead from the whole global training batch on
    every rank (the hypergradient needs the global phi' = phi - lr * mean gradient, which the per-rank
    pieces do not give) and splits the meta batch, averaging the per-rank meta-gradients weighted by shard
    size; this is exact because, at a fixed phi', the hypergradient is linear in the meta-set loss (exact
    and first-order modes; the finite-difference mode's epsilon depends on the local ``||grad L_val||``).
    The result equals single-process training on the same global batch up to rounding (dropout 0).
    """

    def __init__(self, model: nn.Module, train_set, val_set=None, config: TrainerConfig | None = None) -> None:
        self.config = config = config or TrainerConfig()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.rank, self.world_size = _distributed()
        self.device = self._resolve_device(config.device)
        self.train_set, self.val_set = train_set, val_set
        self.train_labels = dataset_labels(train_set)
        if self.train_labels.numel() == 0:
            raise ValueError("train_set is empty")
        self.val_labels = None if val_set is None else dataset_labels(val_set)
        self.model = model
        self.head_name = find_head(model, config.head)
        old_head = model.get_submodule(self.head_name)
        labels_max = int(self.train_labels.max()) if self.val_labels is None or not self.val_labels.numel() \
            else max(int(self.train_labels.max()), int(self.val_labels.max()))
        self.num_classes = max(labels_max + 1, getattr(old_head, "out_features", 0) or 0)
        reference = next((p for p in model.parameters() if p.is_floating_point()), None)
        self.param_dtype = reference.dtype if reference is not None else torch.float32
        if config.classifier == "cosine" and not (isinstance(old_head, CosineClassifier)
                                                  and old_head.num_classes == self.num_classes):
            head = CosineClassifier(head_in_features(model, old_head), self.num_classes, config.cosine_scale)
            replace_head(model, self.head_name, head.to(dtype=self.param_dtype))
        elif getattr(old_head, "out_features", None) != self.num_classes:
            head = nn.Linear(head_in_features(model, old_head), self.num_classes)
            replace_head(model, self.head_name, head.to(dtype=self.param_dtype))
        self.head = model.get_submodule(self.head_name)
        model.to(self.device)
        if config.freeze_backbone:
            mark_only_peft_trainable(model, extra=(self.head,))
        if not config.meta:
            for p in meta_parameters(model):
                p.requires_grad_(False)
        self.rho = meta_parameters(model) if config.meta else []
        self.phi = trainable_phi(model)
        if not self.phi:
            raise ValueError("the model has no trainable PEFT weights or head parameters")
        if self.world_size > 1:
            with torch.no_grad():
                for tensor in model.state_dict().values():
                    dist.broadcast(tensor, src=0)

        counts = torch.bincount(self.train_labels, minlength=self.num_classes)
        self.class_split = class_split_from_counts(counts) if config.class_split == "from_counts" \
            else config.class_split
        self.criterion = LogitAdjustedLoss(counts, config.tau if config.loss == "logit_adjusted" else 0.0)
        self.criterion.to(self.device)
        meta_batch_size = config.meta_batch_size or config.batch_size
        if self.rho and meta_batch_size < self.world_size:
            raise ValueError(f"meta_batch_size ({meta_batch_size}) must be >= the world size ({self.world_size})")
        source = self.train_labels if val_set is None else self.val_labels
        self.meta_sampler = MetaSetSampler(source, config.meta_ratio, meta_batch_size, config.seed,
                                           config.meta_resample, separate_source=val_set is not None) \
            if self.rho else None
        self.train_indices = self.meta_sampler.train_indices() if self.meta_sampler and val_set is None else \
            torch.arange(self.train_labels.numel())
        self.steps_per_epoch = math.ceil(self.train_indices.numel() / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs

        self.optimizer = torch.optim.SGD(self.phi, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.total_steps) \
            if config.schedule == "cosine" else None
        self.meta_optimizer = torch.optim.Adam(self.rho, lr=config.meta_lr) if self.rho else None
        self.epoch = self.step_in_epoch = self.global_step = self.outer_step = 0
        self.output_dir = None if config.output_dir is None else Path(config.output_dir)

    # ----- setup helpers -------------------------------------------------------------------------------
    def _resolve_device(self, name: str) -> torch.device:
        if name != "auto":
            return torch.device(name)
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    def _autocast(self):
        """bf16 autocast on CUDA (``amp="auto"`` or ``"bf16"``), on CPU only with ``amp="bf16"``."""
        kind = self.device.type
        if self.config.amp == "bf16" or (self.config.amp == "auto" and kind == "cuda"):
            return torch.autocast(kind, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        dtype = self.param_dtype if x.is_floating_point() else None
        return x.to(self.device, dtype=dtype, non_blocking=True), y.to(self.device, non_blocking=True).long()

    def _loader(self, dataset, batch_indices: list[torch.Tensor], purpose_step: int) -> DataLoader:
        """Batches of ``dataset`` in the given order; its own generator, so the global RNG stays untouched."""
        return DataLoader(dataset, batch_sampler=[b.tolist() for b in batch_indices],
                          num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
                          generator=generator_for(self.config.seed, LOADER, purpose_step))

    def loss_fn(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Training loss of ``batch`` = (x, y): the configured (logit-adjusted) cross-entropy, mean over B."""
        x, y = batch
        with self._autocast():
            logits = model(x)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return self.criterion(logits, y)

    def _all_reduce_sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum ``tensors`` over ranks in one flat all-reduce (identity on a single process)."""
        if self.world_size == 1:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    # ----- the training step ---------------------------------------------------------------------------
    def _inner_gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """grad_phi of the mean loss over the global batch (x, y): each rank takes its shard, sums weighted
        by shard size across ranks. Returns (gradients in phi order, loss)."""
        start, stop = shard_bounds(len(y), self.rank, self.world_size)
        if stop > start:
            loss = self.loss_fn(self.model, (x[start:stop], y[start:stop])) * ((stop - start) / len(y))
            grads = list(torch.autograd.grad(loss, self.phi, allow_unused=True))
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.phi, grads)]
            loss = loss.detach()
        else:
            grads = [torch.zeros_like(p) for p in self.phi]
            loss = torch.zeros((), device=self.device)
        *grads, loss = self._all_reduce_sum(grads + [loss.to(grads[0].dtype).reshape(1)])
        return grads, loss.reshape(())

    def _meta_step(self, x: torch.Tensor, y: torch.Tensor, batch_indices: torch.Tensor):
        """Hypergradient + Adam step on rho. Returns (hypergradient result, meta loss)."""
        meta_indices = self.meta_sampler.meta_batch(self.outer_step, batch_indices if self.val_set is None else None)
        if meta_indices.numel() < self.world_size:
            raise ValueError(f"outer step {self.outer_step}: the meta batch has {meta_indices.numel()} samples, "
                             f"fewer than the {self.world_size} ranks")
        start, stop = shard_bounds(meta_indices.numel(), self.rank, self.world_size)
        source = self.train_set if self.val_set is None else self.val_set
        val_batch = self._to_device(default_collate([source[int(i)] for i in meta_indices[start:stop]]))
        momentum_buffers = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self.phi]
        if any(b is None for b in momentum_buffers):
            momentum_buffers = None
        result = hypergradient(self.model, self.loss_fn, (x, y), val_batch, lr=self.optimizer.param_groups[0]["lr"],
                               momentum=self.config.momentum, momentum_buffers=momentum_buffers,
                               weight_decay=self.config.weight_decay, mode=self.config.meta_mode)
        weight = (stop - start) / meta_indices.numel()
        *meta_grads, val_loss = self._all_reduce_sum(
            [g * weight for g in result.meta_grads] + [(result.val_loss.detach() * weight).reshape(1)])
        for p, g in zip(self.rho, meta_grads):
            p.grad = g.to(p.dtype)
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.outer_step += 1
        return result, val_loss.reshape(())

    def train_step(self, x: torch.Tensor, y: torch.Tensor, batch_indices: torch.Tensor) -> dict:
        """One global step on the global batch (x, y) (training-set indices ``batch_indices``); returns log values."""
        self.model.train()
        logs = {}
        if self.rho and self.global_step % self.config.meta_interval == 0:
            result, logs["meta_loss"] = self._meta_step(x, y, batch_indices)
            if self.config.meta_reuse_lookahead:
                grads, loss = [g.detach() for g in result.phi_grads], result.train_loss.detach()
            else:
                grads, loss = self._inner_gradients(x, y)
        else:
            grads, loss = self._inner_gradients(x, y)
        for p, g in zip(self.phi, grads):
            p.grad = g.to(p.dtype)
        if self.config.max_grad_norm is not None:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.phi, self.config.max_grad_norm)
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        logs["train_loss"] = loss
        return logs

    # ----- the loop ------------------------------------------------------------------------------------
    def fit(self, eval_set=None, max_steps: int | None = None) -> dict:
        """Train to ``config.epochs`` epochs (resuming from ``output_dir`` when ``config.resume``).

        ``eval_set``: evaluated (and logged) after every epoch. ``max_steps``: stop (with a checkpoint, if
        ``output_dir`` is set) once ``global_step`` reaches it, e.g. mid-epoch. Returns the last evaluation's
        metrics (empty without ``eval_set``) plus ``global_step`` and ``epoch``.
        """
        config = self.config
        if config.resume and self.output_dir is not None and (self.output_dir / CHECKPOINT_NAME).exists():
            self.load_state(self.output_dir / CHECKPOINT_NAME)
        elif self.global_step == 0:
            seed_everything(config.seed)
            if isinstance(self.head, CosineClassifier):
                self.init_head_from_class_means()
            self._truncate_log(0)
        metrics: dict = {}
        while self.epoch < config.epochs:
            batches = epoch_batches(self.train_indices, config.batch_size, config.seed, self.epoch)
            remaining = batches[self.step_in_epoch:]
            loader = self._loader(self.train_set, remaining, self.epoch)
            bar = tqdm(total=len(batches), initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{config.epochs}",
                       disable=not config.progress or self.rank != 0, leave=False)
            for batch_indices, batch in zip(remaining, loader):
                logs = self.train_step(*self._to_device(batch), batch_indices)
                self.step_in_epoch += 1
                self.global_step += 1
                bar.update(1)
                if self.global_step % config.log_every == 0:
                    record = {k: float(v) for k, v in logs.items()}
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}")
                    self.log({"event": "step", "epoch": self.epoch, "global_step": self.global_step, **record})
                if config.save_every_steps and self.global_step % config.save_every_steps == 0:
                    self.save_state()
                if max_steps is not None and self.global_step >= max_steps:
                    bar.close()
                    self.save_state()
                    return {"global_step": self.global_step, "epoch": self.epoch}
            bar.close()
            self.epoch += 1
            self.step_in_epoch = 0
            self.log({"event": "epoch", "epoch": self.epoch, "global_step": self.global_step, "gammas": self.gammas()})
            if eval_set is not None:
                metrics = self.evaluate(eval_set)
                self.log({"event": "eval", "epoch": self.epoch, "global_step": self.global_step, **metrics})
            self.save_state()
        self.export_weights()
        return {**metrics, "global_step": self.global_step, "epoch": self.epoch}

    @torch.no_grad()
    def init_head_from_class_means(self) -> None:
        """Set the cosine head's prototypes to the class-mean features (the head's inputs) over the training set.
        Each rank embeds a contiguous shard; sums and counts are all-reduced."""
        captured = []
        hook = self.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
        sums = torch.zeros(self.num_classes, self.head.in_features, dtype=torch.float64, device=self.device)
        counts = torch.zeros(self.num_classes, dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for x, y in self._shard_loader(self.train_set):
                x, y = self._to_device((x, y))
                captured.clear()
                with self._autocast():
                    self.model(x)
                features = captured[-1].reshape(len(y), -1).double()
                sums.index_add_(0, y, features)
                counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        finally:
            hook.remove()
            self.model.train(was_training)
        sums, counts = self._all_reduce_sum([sums, counts])
        self.head.init_from_class_means(sums, counts)

    def _shard_loader(self, dataset) -> DataLoader:
        start, stop = shard_bounds(len(dataset), self.rank, self.world_size)
        return DataLoader(Subset(dataset, range(start, stop)), batch_size=self.config.batch_size,
                          num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda")

    @torch.no_grad()
    def evaluate(self, dataset) -> dict:
        """Metrics (``metapeft.metrics``) of the model's predictions (raw logits, no logit adjustment) on
        ``dataset``, with ``config.class_split`` groups. Ranks evaluate shards and sum confusion matrices."""
        was_training = self.model.training
        self.model.eval()
        cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64, device=self.device)
        try:
            for batch in self._shard_loader(dataset):
                x, y = self._to_device(batch)
                with self._autocast():
                    predictions = self.model(x).argmax(dim=-1)
                cm.view(-1).index_add_(0, y * self.num_classes + predictions,
                                       torch.ones_like(y, dtype=torch.float64))
        finally:
            self.model.train(was_training)
        (cm,) = self._all_reduce_sum([cm])
        return metrics_from_confusion(cm.cpu(), self.class_split)

    def gammas(self) -> dict[str, list[float]]:
        """Every metapeft module's gamma, by module name."""
        return {name: m.gamma.detach().cpu().tolist() for name, m in self.model.named_modules()
                if isinstance(m, MetaPEFTModule)}

    # ----- state, checkpoints, log ---------------------------------------------------------------------
    def _state_names(self) -> list[str]:
        state = self.model.state_dict()
        if self.config.save_full_model:
            return list(state)
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        return [name for name in state if name in trainable or name.rsplit(".", 1)[-1] == "modulator"]

    def model_state(self) -> dict[str, torch.Tensor]:
        """The saved model tensors: trainable parameters + modulators (or everything, ``save_full_model``)."""
        state = self.model.state_dict()
        return {name: state[name].detach().clone() for name in self._state_names()}

    def state_dict(self) -> dict:
        """Everything an exact resume needs: model tensors, optimizers, scheduler, RNG, loop position."""
        return {
            "model": self.model_state(),
            "optimizer": self.optimizer.state_dict(),
            "meta_optimizer": None if self.meta_optimizer is None else self.meta_optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": rng_state(),
            "position": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                         "global_step": self.global_step, "outer_step": self.outer_step},
            "log_offset": self._log_size(),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (same model construction and config; only the fields in
        ``RUN_CONTROL_FIELDS`` may differ)."""
        saved, current_config = state["config"], self.config.to_dict()
        changed = [k for k in current_config if k not in RUN_CONTROL_FIELDS and saved.get(k) != current_config[k]]
        if changed:
            raise ValueError(f"the checkpoint was written with a different config: {changed} differ "
                             f"({[saved.get(k) for k in changed]} in the checkpoint)")
        missing = set(state["model"]) - set(self.model.state_dict())
        if missing:
            raise ValueError(f"checkpoint has tensors the model lacks: {sorted(missing)[:5]}")
        with torch.no_grad():
            current = self.model.state_dict()
            for name, tensor in state["model"].items():
                current[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.meta_optimizer is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        position = state["position"]
        self.epoch, self.step_in_epoch = position["epoch"], position["step_in_epoch"]
        self.global_step, self.outer_step = position["global_step"], position["outer_step"]
        self._truncate_log(state["log_offset"])

    def save_state(self, path: str | os.PathLike | None = None) -> Path | None:
        """Atomically write the checkpoint (rank 0; default ``output_dir/checkpoint.pt``); None without a path."""
        if path is None and self.output_dir is None:
            return None
        state = self.state_dict()
        written = None
        if self.rank == 0:
            written = save_checkpoint(state, path or self.output_dir / CHECKPOINT_NAME)
        if self.world_size > 1:
            dist.barrier()
        return written

    def load_state(self, path: str | os.PathLike) -> None:
        """Resume from a checkpoint file written by :meth:`save_state` (loaded with ``weights_only=True``)."""
        self.load_state_dict(load_checkpoint(path, map_location=self.device))

    def export_weights(self) -> Path | None:
        """Write the trained tensors (:meth:`model_state`) to ``output_dir/model.safetensors`` (rank 0)."""
        if self.output_dir is None or self.rank != 0:
            return None
        return save_safetensors(self.model_state(), self.output_dir / WEIGHTS_NAME,
                                {"global_step": self.global_step, "config": json.dumps(self.config.to_dict())})

    def _log_size(self) -> int:
        path = None if self.output_dir is None else self.output_dir / LOG_NAME
        return path.stat().st_size if path is not None and path.exists() else 0

    def _truncate_log(self, size: int) -> None:
        """Cut the JSONL log back to ``size`` bytes (drops lines written after the checkpoint being resumed)."""
        if self.output_dir is None or self.rank != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / LOG_NAME, "a+b") as f:
            f.truncate(size)

    def log(self, record: dict) -> None:
        """Append one JSON line to ``output_dir/metrics.jsonl`` (rank 0; nothing without output_dir)."""
        if self.output_dir is None or self.rank != 0:
            return
        with open(self.output_dir / LOG_NAME, "a") as f:
            f.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
