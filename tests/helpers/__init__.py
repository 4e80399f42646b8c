"""Shared test helpers: the float64-oracle tolerance rule, op inputs, tiny models and on-disk datasets.

Test modules import helpers from here only, never from another test module or a conftest.
"""
