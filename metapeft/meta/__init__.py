"""The meta-learning engine: hypergradients of the modulators through a one-step SGD look-ahead."""

from metapeft.meta.attention import math_attention
from metapeft.meta.hypergradient import MODES, HypergradientResult, hypergradient, trainable_phi

__all__ = ["MODES", "HypergradientResult", "hypergradient", "math_attention", "trainable_phi"]
