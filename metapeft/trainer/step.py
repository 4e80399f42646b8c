"""One training step of the bi-level recipe: the meta step on the modulators rho, then the inner step on phi.

At global step ``t`` on the global batch ``B_t`` (docs/method.md, "Bi-level optimization"):

- meta step (every ``meta_interval`` steps, or at the first step of every epoch, and at each of the first
  ``meta_dense_steps`` steps, when the model has learnable modulators and ``meta=True``; before step 0 also the
  scale warm-up, :meth:`BilevelStep.warm_up_modulators`):
  draw a meta batch ``V_t`` (:class:`metapeft.data.sampling.MetaSetSampler`), compute the hypergradient of
  ``L_val(phi_K)`` through K = ``meta_lookahead_steps`` SGD look-ahead steps, the first
  ``phi_1 = phi - lr * (grad_phi L_train(phi, rho; B_t) + wd * phi + mu * m)`` and the others on batches drawn
  from the training set (:func:`metapeft.data.sampling.lookahead_batches`; the meta batch excludes every look-ahead
  batch), with :func:`metapeft.meta.hypergradient`, and take an Adam step on rho;
- inner step: an SGD step (momentum, weight decay, cosine schedule) on phi; with ``meta_module_lr`` each PEFT
  module's step is multiplied by its gamma (the modulator as a module-wise learning rate), in the look-ahead and its
  hypergradient too. The optimizer, :class:`metapeft.meta.optim.ModuleLRSGD`, takes the same rule as the
  look-ahead (:class:`metapeft.meta.inner.SGDRule`). With ``inner_optimizer="adamw"`` the inner step is
  ``torch.optim.AdamW``'s and the look-ahead takes AdamW steps from its state
  (:func:`metapeft.meta.optim.inner_rule_for`, :class:`metapeft.meta.inner.AdamWRule`).

When the meta step's first look-ahead step is the real inner step: it is exactly the update torch's SGD
applies (``buf = mu * buf + g + wd * phi; phi -= lr * buf``) with ``g = grad_phi L_train(phi, rho_t; B_t)``.
The step therefore feeds the hypergradient's ``phi_grads`` to the SGD optimizer instead of running a
second forward/backward; the result equals the look-ahead ``phi_1`` (the same rule on the same tensors). With
``max_grad_norm`` the look-ahead clips each step's gradient as the real step does
(:class:`metapeft.meta.inner.ClippedRule`, whose adjoint runs through the clip). The inner step thus
uses the modulators rho_t from before the outer update (a simultaneous update of phi and rho).
``meta_reuse_lookahead=False`` instead recomputes the inner gradient after the outer step, with rho_{t+1} (DARTS'
alternating order), at the cost of one more forward/backward.

Distributed: every batch (the step's batch, each look-ahead batch, the meta batch) is split into contiguous
shards (:func:`metapeft.data.sampling.shard_bounds`); each rank computes every pass on its shards only and the
pieces are summed weighted by shard size (:func:`metapeft.meta.hypergradient` over the default process group),
so each rank does ~1/world of the work and the result is the single-process one up to rounding.

A ``torch.compile``d model runs the inner step compiled, while the meta step's passes (double backward or
forward-over-reverse, which aot_autograd does not support) run on the eager module under the compile wrapper: same
parameters, same result. Every step reports to a :class:`~metapeft.trainer.nonfinite.NonFiniteMonitor` whether its
input batches, losses, gradient, hypergradient and modulators are finite (device flags, no host sync).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from metapeft.data.sampling import MetaStepSamples
from metapeft.data.shards import Shards
from metapeft.inject import unwrap_model
from metapeft.meta import hypergradient
from metapeft.meta.fsdp import full_copies, gather_full
from metapeft.meta.optim import CommonScaleCalibration, ModuleLRSGD, inner_rule_for, meta_optimizer
from metapeft.params import modulators_with_constraints, module_lr_scales
from metapeft.trainer.config import TrainerConfig
from metapeft.trainer.distributed import all_reduce_sum
from metapeft.trainer.fsdp import copy_full_into, cut_like
from metapeft.trainer.nonfinite import NonFiniteMonitor, all_finite


class TrainingLoss:
    """The training loss ``(model, (x, y)) -> scalar``: the model's logits under ``autocast()`` (cast to float32
    when they come out in half precision), then ``criterion(logits, y)`` (mean over the batch)."""

    def __init__(self, criterion: nn.Module, autocast: Callable[[], object]) -> None:
        self.criterion, self.autocast = criterion, autocast

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        with self.autocast():
            logits = model(x)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return self.criterion(logits, y)


# Hypergradients per calibration round of the warm-up (step 0's batch and 5 fresh ones): with 4 a single outlier
# batch hid an 8x too large scale from the t-test (mean 4.3, half-width 8.3 at alpha = 8r, demo validation seed 100)
WARMUP_DRAWS = 6
# The warm-up's draws are keyed as outer steps from here on (meta and look-ahead batches are functions of the seed and
# the outer step), far beyond any run's own outer steps
WARMUP_OUTER_STEPS = 1 << 40


def _detached(tensors: list[torch.Tensor | None] | None) -> list[torch.Tensor | None] | None:
    return None if tensors is None else [None if t is None else t.detach() for t in tensors]


class BilevelStep:
    """The optimizers and the step (module docstring).

    Args:
        model: the model being trained; ``phi`` / ``rho`` its inner / outer parameters (``rho`` empty: plain PEFT).
        loss_fn: :class:`TrainingLoss`.
        config: the trainer's config (optimizer settings, meta schedule and mode).
        samples: where a meta step's look-ahead and meta batches come from (None without meta-learning).
        shards: which slice of every batch this rank computes, and where it goes.
        total_steps: steps of the whole run (the cosine schedule's length).
        fsdp: the model is sharded by FSDP2 (:mod:`metapeft.trainer.fsdp`): the inner gradient comes from FSDP's
            backward (phi, rho and their optimizer states are ``DTensor``).
    """

    def __init__(self, model: nn.Module, phi: list[nn.Parameter], rho: list[nn.Parameter], loss_fn: TrainingLoss,
                 config: TrainerConfig, samples: MetaStepSamples | None, shards: Shards, total_steps: int,
                 fsdp: bool = False) -> None:
        self.model, self.phi, self.rho, self.loss_fn, self.config, self.fsdp = model, phi, rho, loss_fn, config, fsdp
        self.samples, self.shards, self.world_size = samples, shards, shards.world_size
        self.optimizer = torch.optim.AdamW(phi, lr=config.lr, weight_decay=config.weight_decay) \
            if config.inner_optimizer == "adamw" else \
            ModuleLRSGD(phi, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total_steps) \
            if config.schedule == "cosine" else None
        self.meta_optimizer = meta_optimizer(config.meta_optimizer, rho, config.meta_lr) if rho else None
        self.meta_every = total_steps // config.epochs if config.meta_interval == "epoch" else config.meta_interval
        self.outer_step = 0
        self.warmup_history: list[dict] = []
        self.monitor = NonFiniteMonitor(shards.device)

    def inner_gradients(self, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """grad_phi of the mean loss over a global batch of ``batch_size`` samples, of which (x, y) is this rank's
        shard: the shards' gradients summed weighted by shard size across ranks. Returns (gradients in phi order,
        loss)."""
        if self.fsdp:
            return self._sharded_inner_gradients(x, y, batch_size)
        if len(y):
            loss = self.loss_fn(self.model, (x, y)) * (len(y) / batch_size)
            grads = list(torch.autograd.grad(loss, self.phi, allow_unused=True))
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.phi, grads)]
            loss = loss.detach()
        else:
            grads = [torch.zeros_like(p) for p in self.phi]
            loss = torch.zeros((), device=self.shards.device)
        *grads, loss = all_reduce_sum(grads + [loss.to(grads[0].dtype).reshape(1)], self.world_size)
        return grads, loss.reshape(())

    def _sharded_inner_gradients(self, x: torch.Tensor, y: torch.Tensor,
                                 batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """:meth:`inner_gradients` through FSDP2's backward: every rank runs one (an empty shard a zero loss over its
        empty logits, so FSDP's collectives pair up), on its loss times ``world_size * shard / batch``, so FSDP's
        mean over ranks of the reduce-scattered gradients is the global batch's. Returns ``DTensor`` gradients
        sharded like phi; ``.grad`` is left empty."""
        if len(y):
            loss = self.loss_fn(self.model, (x, y)) * (len(y) / batch_size)
            (loss * self.world_size).backward()
            loss = loss.detach()
        else:
            with self.loss_fn.autocast():
                (self.model(x).sum() * 0.0).backward()
            loss = torch.zeros((), device=self.shards.device)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.phi]
        for p in self.phi + self.rho:
            p.grad = None
        (loss,) = all_reduce_sum([loss.to(self.phi[0].dtype).reshape(1)], self.world_size)
        return grads, loss.reshape(())

    def lr_scales(self) -> list[torch.Tensor | None] | None:
        """With ``meta_module_lr``: each phi tensor's learning-rate multiplier (its module's gamma, differentiable in
        rho; :func:`metapeft.params.module_lr_scales`); else None. Under FSDP2 the multipliers of the real step,
        detached and laid out like phi's shards (computed from full copies of the modulators)."""
        if not (self.rho and self.config.meta_module_lr):
            return None
        model = unwrap_model(self.model)
        if not self.fsdp:
            return module_lr_scales(model, self.phi)
        with full_copies(model, self.rho):
            scales = module_lr_scales(model, self.phi)
        return [None if d is None else cut_like(d.detach().expand(p.shape), p) for d, p in zip(scales, self.phi)]

    def hypergradient(self, x: torch.Tensor, y: torch.Tensor, batch_indices: torch.Tensor, global_step: int):
        """The hypergradient of outer step :attr:`outer_step` on this rank's shards ((x, y): this rank's shard of the
        step's global batch ``batch_indices``) with its own meta batch; counts the outer step and reports to
        :attr:`monitor` as step ``global_step + 1``. Returns :func:`metapeft.meta.hypergradient`'s result."""
        config, samples, shards = self.config, self.samples, self.shards
        train_shard, empty = (x, y), (x[:0], y[:0])
        extra = samples.lookahead(batch_indices, config.meta_lookahead_steps - 1, self.outer_step)
        meta_indices = samples.meta_batch(self.outer_step, torch.cat([batch_indices, *extra]))
        if meta_indices.numel() < self.world_size:
            raise ValueError(f"outer step {self.outer_step}: the meta batch has {meta_indices.numel()} samples, "
                             f"fewer than the {self.world_size} ranks")
        val_shard = shards.collate(samples.meta_source, meta_indices, empty)
        rule, state = inner_rule_for(self.optimizer, self.phi, config.max_grad_norm)  # clips as the real step does
        result = hypergradient(unwrap_model(self.model), self.loss_fn, train_shard, val_shard,
                               inner_rule=rule, inner_state=state,
                               mode=config.meta_mode,
                               lookahead_batches=[shards.collate(samples.train_set, b, empty) for b in extra],
                               reduce=dist.group.WORLD if self.world_size > 1 else None,
                               # computed inside, from the parameters the look-ahead differentiates (FSDP2: gathered)
                               lr_scales=module_lr_scales if self.rho and config.meta_module_lr else None)
        self.outer_step += 1
        self.monitor.observe(global_step + 1, input_batch=all_finite([x, val_shard[0]]),
                             loss=all_finite([result.train_loss, result.val_loss]),
                             hypergradient=all_finite(result.meta_grads))
        return result

    def meta_step(self, x: torch.Tensor, y: torch.Tensor, batch_indices: torch.Tensor, global_step: int):
        """:meth:`hypergradient` + a step of the outer optimizer on rho. Returns (hypergradient result, meta
        loss)."""
        result = self.hypergradient(x, y, batch_indices, global_step)
        for p, g in zip(self.rho, result.meta_grads):
            p.grad = g.to(p.dtype)
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.monitor.observe(global_step + 1, modulator=all_finite(self.rho))
        return result, result.val_loss

    def warm_up_modulators(self, x: torch.Tensor, y: torch.Tensor, batch_indices: torch.Tensor) -> None:
        """Before phi moves: up to ``meta_warmup_steps`` rounds of :class:`metapeft.meta.optim.CommonScaleCalibration`,
        each testing :data:`WARMUP_DRAWS` hypergradients (step 0's batch, then fresh training batches, each with its
        own meta batch) and halving every gamma (``meta_warmup_lr`` = ln 2) while they say the scale overshoots, one
        halving more after the last such round. The rounds are logged as :attr:`warmup_history`.

        The warm-up draws its batches as outer steps :data:`WARMUP_OUTER_STEPS` onwards and then restores the outer-step
        count, so the meta batches of the training that follows are the same with or without it: a warm-up that does
        not move leaves the run exactly as without one."""
        modulators = modulators_with_constraints(unwrap_model(self.model))
        # FSDP2: the calibration's test reads every modulator, so it runs on full copies written back after each round
        calibration = CommonScaleCalibration(gather_full(modulators) if self.fsdp else modulators,
                                             self.config.meta_warmup_lr)
        empty = (x[:0], y[:0])
        outer_step, self.outer_step = self.outer_step, WARMUP_OUTER_STEPS
        for _ in range(self.config.meta_warmup_steps):
            draws = [(x, y, batch_indices)]
            for indices in self.samples.lookahead(batch_indices, WARMUP_DRAWS - 1, self.outer_step,
                                                  len(batch_indices)):
                draws.append((*self.shards.collate(self.samples.train_set, indices, empty), indices))
            moved = calibration.step([gather_full(self.hypergradient(bx, by, bi, 0).meta_grads)
                                      for bx, by, bi in draws])
            if self.fsdp:
                copy_full_into([rho for rho, _ in modulators], [rho for rho, _ in calibration.modulators])
            if not moved:
                break
        self.outer_step = outer_step
        self.warmup_history = calibration.history
        self.monitor.observe(1, modulator=all_finite(self.rho))

    def meta_due(self, global_step: int) -> bool:
        """Whether inner step ``global_step`` (0-based) has a meta step: one of the first ``meta_dense_steps``, or
        on the ``meta_interval`` grid."""
        return global_step < self.config.meta_dense_steps or global_step % self.meta_every == 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, batch_indices: torch.Tensor, global_step: int) -> dict:
        """Step ``global_step`` on the global batch of training-set indices ``batch_indices``, of which (x, y) is
        this rank's shard (:func:`metapeft.data.sampling.shard_bounds`); returns the step's values: ``lr`` (float),
        ``train_loss`` and, when computed, ``meta_loss`` and ``grad_norm`` (0-dim tensors); at step 0 with a warm-up,
        ``warmup_gamma_factor`` (the common factor it applied to every gamma)."""
        logs = {}
        if self.rho and global_step == 0 and self.config.meta_warmup_steps:
            self.warm_up_modulators(x, y, batch_indices)
            logs["warmup_gamma_factor"] = math.exp(self.warmup_history[-1]["log_scale"])
        lr_scales = _detached(self.lr_scales())  # the look-ahead's: gamma before this step's outer update
        if self.rho and self.meta_due(global_step):
            result, logs["meta_loss"] = self.meta_step(x, y, batch_indices, global_step)
            if self.config.meta_reuse_lookahead:
                grads, loss = [g.detach() for g in result.phi_grads], result.train_loss.detach()
            else:
                grads, loss = self.inner_gradients(x, y, len(batch_indices))
                lr_scales = _detached(self.lr_scales())
        else:
            grads, loss = self.inner_gradients(x, y, len(batch_indices))
        self.monitor.observe(global_step + 1, input_batch=all_finite([x]), loss=all_finite([loss]),
                             gradient=all_finite(grads))
        for p, g in zip(self.phi, grads):
            p.grad = g.to(p.dtype)
        if self.config.max_grad_norm is not None:
            # FSDP2: the norm of DTensor gradients is a DTensor; its full value is the global norm
            logs["grad_norm"] = gather_full(torch.nn.utils.clip_grad_norm_(self.phi, self.config.max_grad_norm))
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        if lr_scales is None:
            self.optimizer.step()
        else:
            self.optimizer.step(lr_scales=lr_scales)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        logs["train_loss"] = loss
        return logs

    def state_dict(self) -> dict:
        """The optimizers' and the schedule's state (the outer-step count is part of the loop position)."""
        return {"optimizer": self.optimizer.state_dict(),
                "meta_optimizer": None if self.meta_optimizer is None else self.meta_optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.meta_optimizer is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
