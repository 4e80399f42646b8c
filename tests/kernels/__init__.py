"""Tests of the Triton kernels themselves (kernels/), beyond the ops that launch them."""
