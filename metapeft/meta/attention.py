"""Double-differentiable attention inside a meta step.

PyTorch's fused SDPA kernels (flash / memory-efficient, and ``_scaled_dot_product_flash_attention_for_cpu``
on CPU) have neither a double backward nor a forward-mode rule, so an exact (second-order) hypergradient
through a timm ViT fails in the second backward with "derivative for ..._backward is not implemented".
:func:`math_attention` switches a model to attention built from plain differentiable ops for the duration
of a block, then restores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def math_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with double-differentiable attention inside the ``with`` block.

    Two switches, both undone on exit (also on an exception):

    - every submodule with a boolean ``fused_attn`` attribute (timm's ``Attention`` and its relatives)
      gets ``fused_attn = False``: timm then computes ``softmax(q k^T * scale) v`` from matmul and softmax,
      whose double backward exists in every PyTorch 2.x, independent of the SDPA dispatcher;
    - any other ``F.scaled_dot_product_attention`` call (e.g. ``nn.MultiheadAttention``) is restricted to
      SDPA's math backend, a composite of differentiable ops.

    Only the forward needs the switch: the graph it records is what the double backward runs on.
    """
    switched = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool) and m.fused_attn]
    for module in switched:
        module.fused_attn = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for module in switched:
            module.fused_attn = True
