"""``TrainerConfig``: every knob of :class:`metapeft.MetaPEFTTrainer`, checked at construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from metapeft.data.sampling import META_SAMPLINGS
from metapeft.meta.optim import META_OPTIMIZERS
from metapeft.schema import option

LOSSES = ("logit_adjusted", "ce")
CLASSIFIERS = ("cosine", "linear")
SCHEDULES = ("cosine", "constant")
AMP_MODES = ("auto", "bf16", "none")
META_MODES = ("exact", "finite_difference", "first_order")
INNER_OPTIMIZERS = ("sgd", "adamw")
# Fields a resumed run may change: they do not alter the training trajectory.
RUN_CONTROL_FIELDS = ("resume", "overwrite", "progress", "num_workers", "log_every", "save_every_steps", "output_dir",
                      "device", "fsdp")
# What each annotation admits: bools are not ints here (``batch_size: true`` is an error), floats are finite.
_KINDS = {
    "int": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a finite number", lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "None": ("null", lambda v: v is None),
    "dict[str, list[int]]": ("a mapping of group name to class indices", lambda v: isinstance(v, dict)),
}


def _check_type(name: str, annotation: str, value) -> None:
    """``ValueError`` naming the field unless ``value`` is one of the ``|``-separated kinds of ``annotation``."""
    kinds = [_KINDS[kind.strip()] for kind in annotation.split("|")]
    if not any(accepts(value) for _, accepts in kinds):
        expected = " or ".join(what for what, _ in kinds)
        raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


@dataclass
class TrainerConfig:
    """Every knob of :class:`MetaPEFTTrainer`; the defaults are the paper's recipe (docs/method.md) except the meta
    schedule (first-order every 5 steps instead of exact at every step; see the comment on ``meta_interval``).

    Inner loop (phi = trainable non-modulator parameters: PEFT weights + head): SGD with ``lr``,
    ``momentum``, ``weight_decay`` (or, ``inner_optimizer="adamw"``, ``torch.optim.AdamW`` with ``lr``,
    ``weight_decay`` and torch's betas and eps; the meta step's look-ahead then takes AdamW steps from the
    optimizer's state, :class:`metapeft.meta.inner.AdamWRule`), a per-step ``schedule`` over ``epochs`` epochs of
    ``batch_size``.
    Outer loop (rho = modulators): Adam with ``meta_lr`` every ``meta_interval`` inner steps (``"epoch"``: at
    the first step of every epoch, the authors' schedule), hypergradient mode ``meta_mode``, meta batches of
    ``meta_batch_size`` (default ``batch_size``) drawn from a stratified ``meta_ratio`` sample of the training
    set, re-sampled every outer step unless ``meta_resample=False`` (a fixed split, excluded from the inner loop's
    data); each meta batch is a random draw from that meta set,
    ``meta_sampling="uniform"`` (every class in its meta-set share) or ``"class_balanced"`` (an equal share per
    class, small classes drawn with replacement; :mod:`metapeft.data.sampling`). A ``val_set`` given to the trainer
    replaces the training set as the meta-batch source. ``meta=False`` (or a model without learnable modulators)
    trains as plain PEFT. ``meta_lookahead_steps`` K: SGD steps of the meta step's look-ahead, the first on the step's
    own batch, the others on batches of ``batch_size`` drawn from the training set
    (:func:`metapeft.data.sampling.lookahead_batches`); the authors' code uses K = 2-3. ``meta_warmup_steps``: at most
    that many rounds before the first inner step that halve every gamma (``exp(-meta_warmup_lr)``) while a one-sided
    t-test over 6 hypergradients says the scale overshoots, and once more after the last such round
    (:class:`metapeft.meta.optim.CommonScaleCalibration`): a far-too-large scale is rescued before phi moves;
    ``meta_dense_steps``: the first inner steps each get a meta step, ``meta_interval`` applies after them (dense meta
    steps early, sparse later). ``meta_module_lr``: gamma also multiplies its module's inner learning rate (the
    modulator as a module-wise learning rate; the hypergradient then has a learning-rate term).

    Loss ``"logit_adjusted"`` (tau) or ``"ce"``; ``classifier="cosine"`` replaces the head (found by name
    ``head`` or automatically) with a cosine classifier of scale ``cosine_scale`` initialised from class-mean
    features, ``"linear"`` keeps it (resized if its width is not the number of classes). ``amp``: bf16
    autocast on CUDA (``"auto"``), everywhere (``"bf16"``) or never. ``output_dir`` receives
    ``checkpoint.pt`` (each epoch, every ``save_every_steps`` steps and on an early stop), ``metrics.jsonl``
    and the final ``model.safetensors``; it holds one run (:mod:`metapeft.runs.lock`): a new run refuses a
    non-empty directory, ``resume=True`` continues from its checkpoint when one exists, ``overwrite=True`` moves
    the old run aside to a timestamped sibling first. ``num_classes``: the number of classes the data declares
    (every label must be below it; default: the largest label + 1, at least the model head's width).
    ``class_split`` names class groups for the metrics (e.g. ``{"head": [...], "tail": [...]}``), or
    ``"from_counts"`` for many/medium/few by training-set counts (> 100, 20-100, < 20).
    """

    epochs: int = option(10, "training epochs")
    batch_size: int = option(128, "images per inner step (global: split over the processes under torchrun)")
    inner_optimizer: str = option("sgd", "inner optimizer of phi: sgd (the paper's) or adamw (torch.optim.AdamW, "
                                         "betas 0.9/0.999, eps 1e-8; momentum unused); the meta step's look-ahead "
                                         "follows it")
    lr: float = option(0.01, "inner learning rate of phi (PEFT weights and head); the schedule starts here")
    momentum: float = option(0.9, "inner SGD momentum (sgd only)")
    weight_decay: float = option(5e-4, "inner weight decay (sgd: L2 added to the gradient; adamw: decoupled)")
    schedule: str = option("cosine", "inner learning rate per step: cosine (to 0 over all steps) or constant")
    max_grad_norm: float | None = option(None, "clip the inner gradient's norm to this (the meta step's look-ahead "
                                               "clips as well); null: no clipping")

    meta: bool = option(True, "learn the modulators gamma by meta steps (MetaPEFT); false: plain PEFT (gamma stays "
                              "fixed)")
    meta_lr: float = option(1e-3, "learning rate of the outer optimizer on the modulators rho")
    meta_optimizer: str = option("adam", "outer optimizer on rho: adam (the paper's), shared_adam (one second moment "
                                         "for all modulators: keeps the hypergradient's direction) or sgd")
    # A first-order meta step every 5 inner steps costs 1.10x plain LoRA's fine-tuning CPU time on the demo task
    # (benchmarks/results/meta_defaults_cpu.md; 1 + 0.85 / 5 from a 1.85x meta step) with accuracy within the seeds'
    # noise of the best schedule; an exact meta step at every step costs 2.9x (schedule_cpu.md, README "What the
    # meta step costs").
    meta_interval: int | str = option(5, "inner steps per meta step, or 'epoch' (a meta step at the first step of "
                                         "every epoch, the authors' schedule)")
    meta_mode: str = option("first_order", "hypergradient: exact (second order), finite_difference (DARTS' central "
                                           "difference) or first_order (drops the second-order term; the authors' "
                                           "code)")
    meta_ratio: float = option(0.2, "share of the training set in the stratified meta set, in (0, 1)")
    meta_resample: bool = option(True, "re-draw the meta set at every outer step; false: one fixed split, excluded "
                                       "from the inner loop's data")
    meta_sampling: str = option("uniform", "how a meta batch is drawn from the meta set: uniform (every class in its "
                                           "meta-set share) or class_balanced (an equal expected share per class, "
                                           "small classes with replacement)")
    meta_batch_size: int | None = option(None, "images per meta batch; null: batch_size")
    meta_reuse_lookahead: bool = option(True, "the inner step reuses the meta step's first look-ahead step (rho from "
                                              "before the outer update); false: recompute it after the outer step "
                                              "(DARTS' order, one more forward/backward)")
    meta_lookahead_steps: int = option(1, "K: SGD steps of the meta step's look-ahead, the first on the step's batch, "
                                          "the others on fresh training batches (the authors' code: 2-3)")
    meta_module_lr: bool = option(False, "gamma also multiplies its module's inner learning rate (the modulator as a "
                                         "module-wise learning rate)")
    meta_warmup_steps: int = option(6, "at most this many calibration rounds before the first inner step: each tests "
                                       "6 hypergradients and halves every gamma while the meta loss says the scale "
                                       "overshoots (95 %, one-sided), then once more; never grows a gamma; 0: off")
    meta_warmup_lr: float = option(0.69, "log of the warm-up's factor per round (0.69: every gamma /2)")
    meta_dense_steps: int = option(0, "the first inner steps that each get a meta step; meta_interval applies after "
                                      "them")

    loss: str = option("logit_adjusted", "logit_adjusted (logit-adjusted cross-entropy, temperature tau) or ce")
    tau: float = option(1.0, "logit adjustment temperature")
    classifier: str = option("cosine", "cosine (the head replaced by a cosine classifier of scale cosine_scale, "
                                       "initialised from class-mean features) or linear (the model's own head, resized"
                                       " to the class count if needed)")
    cosine_scale: float = option(25.0, "logit scale of the cosine classifier")
    head: str | None = option(None, "qualified name of the head module; null: found automatically (head, or timm's "
                                    "get_classifier())")
    freeze_backbone: bool = option(True, "train only PEFT weights, modulators and the head; false: the backbone trains"
                                         " too")

    amp: str = option("auto", "bf16 autocast: auto (on CUDA), bf16 (everywhere) or none")
    device: str = option("auto", "auto (CUDA when available, else CPU) or a torch device (cpu, cuda, cuda:1)")
    fsdp: bool = option(False, "under torchrun, shard the parameters over the ranks with FSDP2 (fully_shard on every "
                               "ViT block and the root): plain steps hold about 1/world of them, each meta step, "
                               "evaluation and checkpoint gathers the whole model once; false: every rank holds it")
    seed: int = option(0, "seed of the batch order, dropout masks and meta batches")
    num_workers: int = option(0, "DataLoader worker processes")
    progress: bool = option(True, "show progress bars")
    log_every: int = option(10, "steps between records in metrics.jsonl (under torchrun also where a stop request is "
                                "honoured)")

    output_dir: str | None = option(None, "the run directory (checkpoint.pt, metrics.jsonl, model.safetensors); null: "
                                          "nothing written")
    save_every_steps: int | None = option(None, "also write a checkpoint every N steps; null: at each epoch end only")
    save_full_model: bool = option(False, "model.safetensors holds every tensor, not only the trained ones")
    resume: bool = option(False, "continue from output_dir's checkpoint when one exists")
    overwrite: bool = option(False, "move an existing run in output_dir aside (to a timestamped sibling) first")
    num_classes: int | None = option(None, "the number of classes the data declares; null: the largest label + 1 (at "
                                           "least the head's width)")
    class_split: dict[str, list[int]] | str | None = option(None, "class groups for the metrics ({head: [0, 1], tail: "
                                                                  "[2]}), 'from_counts' (many / medium / few by "
                                                                  "training counts) or null")

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            _check_type(spec.name, spec.type, getattr(self, spec.name))
        positive_ints = ("epochs", "batch_size", "meta_lookahead_steps", "log_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.meta_interval != "epoch" and (not isinstance(self.meta_interval, int) or self.meta_interval < 1):
            raise ValueError(f"meta_interval must be a positive int or 'epoch', got {self.meta_interval!r}")
        for name in ("meta_warmup_steps", "meta_dense_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("meta_batch_size", "save_every_steps", "num_classes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        for name in ("lr", "meta_lr", "meta_warmup_lr", "cosine_scale"):
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
                              ("amp", AMP_MODES), ("meta_mode", META_MODES), ("meta_sampling", META_SAMPLINGS),
                              ("meta_optimizer", META_OPTIMIZERS), ("inner_optimizer", INNER_OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.inner_optimizer == "adamw" and self.meta_module_lr:
            raise ValueError("meta_module_lr needs inner_optimizer='sgd': torch's AdamW step takes no per-module "
                             "learning rates")
        if isinstance(self.class_split, str) and self.class_split != "from_counts":
            raise ValueError(f"class_split must be a dict, 'from_counts' or None, got {self.class_split!r}")
        if (self.resume or self.overwrite) and self.output_dir is None:
            raise ValueError("resume=True and overwrite=True need output_dir (the run directory)")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in output_dir, "
                             "overwrite moves it aside and starts a new one")

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return dataclasses.asdict(self)
