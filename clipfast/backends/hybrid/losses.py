"""The losses on the hybrid panels: the CLIP and SigLIP custom operators
(``hybrid_clip_loss_op``, ``hybrid_siglip_ops``) and the one-direction row
primitives (``HybridRowCrossEntropyFunction``: hard negatives, asymmetric
InfoNCE, open_clip's local_loss).

Only autograd and bookkeeping live here; the panel loops in ``panels``, the
kernels in ``epilogue_kernels``.
"""

from __future__ import annotations

import torch

from .._ops import (KernelOptions, RowCrossEntropyFunction, clip_forward_result,
                    define_clip_loss_op, define_siglip_ops, kept_buffer, row_forward,
                    without_autocast)
from ..triton.launchers import fp32_scalars
from . import panels
from .panels import SIGMOID, SOFTMAX, GradSpec


def _kept_buffer(x, y, options: KernelOptions):
    return kept_buffer(panels.kept_rows, x, y, options)


def _scale_grad(total: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return total.reshape(scale.shape).to(scale.dtype)


def hybrid_forward(x, y, scale, bias, options: KernelOptions):
    """(loss, stats, kept) of the symmetric CLIP loss (see ``clipfast.backends._ops``)."""
    scale_f32, bias_f32 = fp32_scalars(scale, bias)
    ops = panels.operands(x, y, options.normalize, options.allow_tf32)
    kept = _kept_buffer(x, y, options)
    inv_x, inv_y = ops.feature_inverse_norms()
    loss, stats = clip_forward_result(inv_x, inv_y, *panels.softmax_stats(
        ops, scale_f32, bias_f32, 0, True, options.block, kept))
    return loss, stats, kept


def hybrid_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                    need_x: bool, need_y: bool, need_scale: bool, kept=None):
    inv_x, inv_y, row_max, row_logsum, col_max, col_logsum = stats
    scale_f32, bias_f32 = fp32_scalars(scale, bias)
    ops = panels.operands(x, y, options.normalize, options.allow_tf32, inv_x, inv_y)
    coef = grad_loss.float().reshape(1) / (2 * x.shape[0])
    spec = GradSpec(SOFTMAX, coef, coef, (row_max, row_logsum), (col_max, col_logsum), 0)
    grad_x, grad_y, scale_sum, _ = panels.feature_grads(
        x, y, inv_x, inv_y, ops, scale_f32, bias_f32, spec, options.block, kept, need_x, need_y)
    return grad_x, grad_y, _scale_grad(scale_sum, scale) if need_scale else None


hybrid_clip_loss_op = define_clip_loss_op("hybrid", hybrid_forward, hybrid_backward,
                                          kept_rows=panels.kept_rows)


def hybrid_siglip_forward(x, y, scale, bias, options: KernelOptions, positives: bool = True):
    """(loss, stats = [inv_x, inv_y], kept) of SigLIP's loss."""
    scale_f32, bias_f32 = fp32_scalars(scale, bias)
    ops = panels.operands(x, y, options.normalize, options.allow_tf32)
    kept = _kept_buffer(x, y, options)
    total = panels.sigmoid_sum(ops, scale_f32, bias_f32, positives, options.block, kept)
    inv_x, inv_y = ops.feature_inverse_norms()
    return (total / x.shape[0]).float(), torch.stack([inv_x, inv_y]), kept


def hybrid_siglip_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                           need_x: bool, need_y: bool, need_scale: bool, need_bias: bool,
                           positives: bool = True, kept=None):
    inv_x, inv_y = stats
    scale_f32, bias_f32 = fp32_scalars(scale, bias)
    ops = panels.operands(x, y, options.normalize, options.allow_tf32, inv_x, inv_y)
    coef = grad_loss.float().reshape(1) / x.shape[0]
    spec = GradSpec(SIGMOID, coef, None, None, None, 0 if positives else None)
    grad_x, grad_y, scale_sum, bias_sum = panels.feature_grads(
        x, y, inv_x, inv_y, ops, scale_f32, bias_f32, spec, options.block, kept, need_x, need_y)
    return (grad_x, grad_y, _scale_grad(scale_sum, scale) if need_scale else None,
            bias_sum.reshape(bias.shape).to(bias.dtype) if need_bias and bias is not None else None)


hybrid_siglip_ops = define_siglip_ops("hybrid", hybrid_siglip_forward, hybrid_siglip_backward,
                                      kept_rows=panels.kept_rows)


class HybridRows:
    """The row primitives of ``RowCrossEntropyFunction`` on the hybrid panels.

    Under a memory budget the dots of the first panels are kept on this
    object between the forward and the backward (read-only, so a
    retain_graph backward may run again)."""

    name = "hybrid"

    def __init__(self, normalize: bool, allow_tf32: bool, block: int, memory_budget: float):
        self.options = KernelOptions(normalize, allow_tf32, block, memory_budget)
        self.kept = None

    def prepare(self, queries, keys, scale, bias):
        scale_f32, bias_f32 = fp32_scalars(scale, bias)
        self._ops = panels.operands(queries, keys, self.options.normalize,
                                    self.options.allow_tf32)
        inv_q, inv_k = self._ops.feature_inverse_norms()
        return inv_q, inv_k, scale_f32, bias_f32

    def stats(self, queries, keys, inv_q, inv_k, s, b, label_offset):
        self.kept = _kept_buffer(queries, keys, self.options)
        row_max, row_sum, _, _, diag = panels.softmax_stats(
            self._ops, s, b, label_offset, False, self.options.block, self.kept)
        self._ops = None  # recomputed from the saved inverse norms
        return row_max, row_sum, diag

    def grads(self, queries, keys, inv_q, inv_k, s, b, row_stats, label_offset, coef, needs,
              scale_meta):
        need_q, need_k, need_scale = needs
        ops = panels.operands(queries, keys, self.options.normalize, self.options.allow_tf32,
                              inv_q, inv_k)
        spec = GradSpec(SOFTMAX, coef.float().reshape(1), None, row_stats, None, label_offset)
        grad_q, grad_k, scale_sum, _ = panels.feature_grads(
            queries, keys, inv_q, inv_k, ops, s, b, spec, self.options.block, self.kept,
            need_q, need_k)
        grad_scale = scale_sum.reshape(scale_meta[0]).to(scale_meta[1]) if need_scale else None
        return grad_q, grad_k, grad_scale


class HybridRowCrossEntropyFunction(RowCrossEntropyFunction):
    """``RowCrossEntropyFunction`` on the hybrid panels."""

    @staticmethod
    @without_autocast
    def forward(ctx, queries, keys, scale, bias, normalize: bool, label_offset: int,
                allow_tf32: bool, block: int, memory_budget: float, extra_logits=None):
        rows = HybridRows(normalize, allow_tf32, block, memory_budget)
        return row_forward(ctx, rows, queries, keys, scale, bias, label_offset, extra_logits)
