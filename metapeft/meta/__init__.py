"""The meta-learning engine: hypergradients of the modulators through a K-step SGD look-ahead, sharded over
the ranks of a process group when one is given. Parts: ``inner`` (the inner update rule, shared with the trainer's
real step), ``lookahead`` (the forward look-ahead and the reverse recursion), one module per mode (``exact``,
``finite_difference``, ``first_order``), ``hypergradient`` (the public function), ``optim`` (the optimizers)."""

from metapeft.meta.attention import math_attention
from metapeft.meta.distributed import as_reduction, rank_sum
from metapeft.meta.hypergradient import MODES, HypergradientResult, hypergradient
from metapeft.params import trainable_phi

__all__ = ["MODES", "HypergradientResult", "as_reduction", "hypergradient", "math_attention", "rank_sum",
           "trainable_phi"]
