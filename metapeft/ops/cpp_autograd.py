"""The C++ route of an eager call: where ``metapeft._C`` is built, each op family's ``cpp_op`` is its C++ op
(``csrc/autograd.cpp``: ``metapeft::scaled_lora``, ``metapeft::adapter``), whose forward and backward are registered
with the dispatcher's Autograd key. :meth:`metapeft.ops.family.FusedOp.call` takes it for eager torch-backend calls
without dropout (outside ``torch.compile`` and ``torch.func`` transforms): one dispatcher call from Python, a
backward without Python, a differentiable backward for double backward.

Arguments: x (..., K), the family's arguments object, modulator (S,) / (1,), constraint, factor, then the family's
options (the adapter's activation); the scale is ``factor * gamma(modulator)``. Without ``_C`` (or with one built from
older sources) ``cpp_op`` stays None and the Python routes run. ``CPP_ROUTE_ERROR`` says why it is absent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from metapeft.ops.adapter_op import ADAPTER
from metapeft.ops.cuda_backend import EXTENSION_ERROR
from metapeft.ops.scaled_lora_op import SCALED_LORA

CPP_ROUTE_ERROR = EXTENSION_ERROR
if CPP_ROUTE_ERROR is None and not hasattr(torch.ops.metapeft, "adapter"):
    CPP_ROUTE_ERROR = ("metapeft._C was built without csrc/autograd.cpp; rebuild it "
                       "(pip install --no-build-isolation -e .)")

if CPP_ROUTE_ERROR is None:
    SCALED_LORA.cpp_op = torch.ops.metapeft.scaled_lora.default
    ADAPTER.cpp_op = torch.ops.metapeft.adapter.default


@contextlib.contextmanager
def python_routes() -> Iterator[None]:
    """Inside the block eager calls take the Python routes, as where ``metapeft._C`` is absent (for tests and the
    host-overhead benchmark; it changes process-wide state, so it is not for concurrent use)."""
    saved = SCALED_LORA.cpp_op, ADAPTER.cpp_op
    SCALED_LORA.cpp_op = ADAPTER.cpp_op = None
    try:
        yield
    finally:
        SCALED_LORA.cpp_op, ADAPTER.cpp_op = saved
