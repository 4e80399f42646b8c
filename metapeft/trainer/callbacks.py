"""Observing training: the callback events of :meth:`metapeft.MetaPEFTTrainer.fit` and their payloads.

Pass ``callbacks=[...]`` to the trainer: objects with any of the methods below (subclass :class:`Callback` for no-op
defaults). Every rank calls them, in list order, on the training thread; an exception raised by a callback ends
``fit`` (the last checkpoint stays). Events, in the order ``fit`` emits them:

- ``on_fit_start(trainer)``: after resuming or initialising, before the first step;
- ``on_step_end(trainer, record)``: after every training step; ``record`` = ``{"event": "step", "epoch",
  "global_step", "step_in_epoch", "batch_size", "lr", "train_loss"}`` plus ``"meta_loss"`` on meta steps and
  ``"grad_norm"`` with ``max_grad_norm``;
- ``on_checkpoint(trainer, record)``: after a checkpoint file is complete; ``{"path", "reason", "epoch",
  "step_in_epoch", "global_step"}``;
- ``on_epoch_end(trainer, record)``: after an epoch's last step; ``{"event": "epoch", "epoch", "global_step",
  "gammas"}``;
- ``on_evaluate(trainer, record)``: after the per-epoch evaluation of ``fit(eval_set=...)``; ``{"event": "eval",
  "epoch", "global_step", **metrics}``;
- ``on_fit_end(trainer, result)``: when ``fit`` returns (finished, stopped, or at ``max_steps``); ``fit``'s result.

Positions count what is done: ``global_step`` steps in total, ``step_in_epoch`` steps of the current epoch
(``epoch``, 0-based, in a step record), ``epoch`` completed epochs in epoch and eval records. In a step record
``train_loss``, ``meta_loss`` (meta steps only) and ``grad_norm`` (with ``max_grad_norm``) are 0-dim tensors on the
training device, so that observing every step costs no host synchronisation; ``float()`` them when needed. ``lr``
is the step's inner learning rate. ``gammas`` maps each metapeft module's name to its gamma list; metrics are
:func:`metapeft.metrics.metrics_from_confusion`'s. A checkpoint's ``reason`` is ``"interval"``
(``save_every_steps``), ``"epoch"``, ``"max_steps"`` or ``"stop"`` (:meth:`~metapeft.MetaPEFTTrainer.request_stop`);
``path`` is the file written by rank 0. Within one step the order is ``on_step_end``, then ``on_checkpoint`` of an
interval checkpoint; at an epoch's end ``on_epoch_end``, ``on_checkpoint``, ``on_evaluate`` (the checkpoint comes
first, so an evaluation that fails loses no training; a run resumed from it evaluates first).
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Base class with a no-op method per event (module docstring); override the ones you need."""

    def on_fit_start(self, trainer: Any) -> None:
        """Training is about to start (or continue, after a resume)."""

    def on_step_end(self, trainer: Any, record: dict) -> None:
        """A training step finished; ``record`` as in the module docstring."""

    def on_checkpoint(self, trainer: Any, record: dict) -> None:
        """A checkpoint file was written completely."""

    def on_epoch_end(self, trainer: Any, record: dict) -> None:
        """An epoch finished."""

    def on_evaluate(self, trainer: Any, record: dict) -> None:
        """The per-epoch evaluation finished."""

    def on_fit_end(self, trainer: Any, result: dict) -> None:
        """``fit`` is returning ``result``."""


EVENTS = tuple(name for name in vars(Callback) if name.startswith("on_"))
