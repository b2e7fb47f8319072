"""The Triton backend (``backend="triton"``): fused kernels for CUDA GPUs.

This file only declares the backend; importing it does not import triton.
The modules below import triton when an entry point is first used (or when
a test imports them directly); each imports only from the layers under it:

  clip_loss.py, siglip.py   autograd Functions and custom ops (the entry points)
  launchers.py              configs, grids, panel sizing and kernel launches
  forward_kernels.py,       the @triton.jit kernels, by pass
  backward_kernels.py
  tile_math.py              the tile math every kernel inlines

``aot.py`` (ahead-of-time compilation through the launchers, for
``clipfast.aot_check`` and ``clipfast.perfmodel``) sits beside them.
"""

from __future__ import annotations

from .._base import BLOCKS, ROWS, SIGLIP, Backend
from ._runtime import interpreter_requested, triton_available, usable_on

__all__ = ["BACKEND", "TritonBackend", "interpreter_requested", "triton_available", "usable_on"]


class TritonBackend(Backend):
    name = "triton"
    summary = ("fused Triton kernels: CUDA tensors (CPU tensors through the interpreter with "
               "TRITON_INTERPRET=1)")
    dtype_hint = "; use backend='chunked' or 'reference' for float64"
    losses = frozenset({SIGLIP, ROWS, BLOCKS})
    block_option = "panel_size"

    def device_problem(self, device):
        if not usable_on(device):
            return ValueError(
                f"backend={self.name!r} needs CUDA tensors, got features on {device} "
                "(set TRITON_INTERPRET=1 before importing triton to run the kernels "
                "on the CPU through Triton's interpreter)")
        return None

    def problem(self, inputs):
        if not triton_available():
            return RuntimeError(
                f"backend={self.name!r} needs the triton package (pip install triton); "
                "use backend='chunked' on machines without it")
        return super().problem(inputs)

    def native(self, device, dtypes):
        return (device.type == "cuda" and all(dt in self.dtypes for dt in dtypes)
                and triton_available())

    def clip_op(self):
        from .clip_loss import triton_clip_loss_op

        return triton_clip_loss_op

    def siglip_ops(self):
        from .siglip import triton_siglip_ops

        return triton_siglip_ops

    def row_loss(self, normalize, allow_tf32, block, memory_budget=0.0):
        from .clip_loss import TritonRowCrossEntropyFunction

        panel = block or None
        return lambda q, k, s, b, label_offset, extra: TritonRowCrossEntropyFunction.apply(
            q, k, s, b, normalize, label_offset, allow_tf32, panel, extra)

    def block_ops(self):
        from .clip_loss import TritonBlockOps

        return TritonBlockOps


BACKEND = TritonBackend()
