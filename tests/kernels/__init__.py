"""Tests of the Triton kernels themselves (metapeft/kernels/), beyond the ops that launch them."""
