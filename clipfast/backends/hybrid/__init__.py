"""The hybrid backend (``backend="hybrid"``): library GEMMs for the four
matrix products, Triton kernels for everything they cannot fuse.

cuBLAS (through torch) already runs N x d x N products at the GPU's bound;
what it cannot do is the softmax statistics, the gradient of the loss with
respect to the logits and the normalisation. So each row panel of the logits
is one GEMM with an fp32 result, and one Triton epilogue per pass reads it
once (``panels`` has the loops, ``epilogue_kernels`` the kernels, which use
no ``tl.dot``: the interpreter runs them on the CPU exactly). Extra memory is
one fp32 panel, an fp32 accumulator for dY and the O(N) statistics; with a
``memory_budget`` the forward keeps panels and the backward skips their
recomputation (three GEMMs instead of four per kept panel).

This file only declares the backend; importing it does not import triton:

  losses.py             custom ops and autograd Functions (the entry points)
  panels.py             GEMM operands, the panel loops and the launches
  epilogue_kernels.py   the @triton.jit epilogues
"""

from __future__ import annotations

from .._base import ROWS, SIGLIP
from ..triton import TritonBackend

__all__ = ["BACKEND", "HybridBackend"]


class HybridBackend(TritonBackend):
    """Runs where the Triton backend runs (its device and package checks),
    with its own entry points."""

    name = "hybrid"
    summary = ("cuBLAS panel products with fp32 logits + Triton epilogues: CUDA tensors (CPU "
               "tensors through the interpreter with TRITON_INTERPRET=1); honours memory_budget")
    losses = frozenset({SIGLIP, ROWS})
    block_option = "panel_size"
    # The ring mode's block primitives: the fused Triton kernels'.
    stand_in = "triton"
    keeps_logits = True

    def clip_op(self):
        from .losses import hybrid_clip_loss_op

        return hybrid_clip_loss_op

    def siglip_ops(self):
        from .losses import hybrid_siglip_ops

        return hybrid_siglip_ops

    def row_loss(self, normalize, allow_tf32, block, memory_budget=0.0):
        from .losses import HybridRowCrossEntropyFunction

        return lambda q, k, s, b, label_offset, extra: HybridRowCrossEntropyFunction.apply(
            q, k, s, b, normalize, label_offset, allow_tf32, block, memory_budget, extra)

    def block_ops(self):
        raise NotImplementedError("backend='hybrid' has no block primitives (its stand-in "
                                  "'triton' serves the ring mode)")


BACKEND = HybridBackend()
