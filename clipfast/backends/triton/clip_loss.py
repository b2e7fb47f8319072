"""The CLIP loss through the fused Triton kernels: the custom operator
(``triton_clip_loss_op``), one direction over a rectangular block
(``TritonRowCrossEntropyFunction``, open_clip's local_loss) and the ring's
per-block operations (``TritonBlockOps``).

Only autograd and bookkeeping live here; kernels in ``forward_kernels`` /
``backward_kernels``, their launches in ``launchers``.
"""

from __future__ import annotations

import functools

import torch

from .._ops import (KernelOptions, RowCrossEntropyFunction, clip_forward_result,
                    define_clip_loss_op, row_forward, without_autocast)
from .launchers import (block_grads, block_stats, feature_grads, finish_feature_grad,
                        folds_inv_norms, fp32_scalars, inverse_norms)


def _feature_and_scale_grads(x, y, inv_x, inv_y, scale, bias, row_stats, col_stats, diag_offset,
                             coef, need_x, need_y, need_scale, scale_meta, normalize, allow_tf32,
                             panel):
    """Input gradients of a loss that is ``coef`` x the sum over one block's G."""
    factor = (scale * coef).contiguous()
    grad_x, grad_y, scale_grad = feature_grads(
        x, y, inv_y, factor, need_x, need_y, normalize,
        functools.partial(block_grads, x, y, inv_x, inv_y, scale, bias, row_stats, col_stats,
                          diag_offset, normalize=normalize, allow_tf32=allow_tf32, panel=panel))
    grad_scale = None
    if need_scale:
        grad_scale = (scale_grad * coef).reshape(scale_meta[0]).to(scale_meta[1])
    return grad_x, grad_y, grad_scale


def triton_forward(x, y, scale, bias, options: KernelOptions):
    """(loss, stats) through the fused kernels (see ``clipfast.backends._ops``)."""
    scale_f32, bias_f32 = fp32_scalars(scale, bias)
    inv_x, inv_y = inverse_norms(x, options.normalize), inverse_norms(y, options.normalize)
    return clip_forward_result(inv_x, inv_y, *block_stats(
        x, y, inv_x, inv_y, scale_f32, bias_f32, 0, True, options.allow_tf32))


def triton_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                    need_x: bool, need_y: bool, need_scale: bool):
    inv_x, inv_y, row_max, row_logsum, col_max, col_logsum = stats
    scale_f32, bias_f32 = fp32_scalars(scale, bias)
    coef = grad_loss.float().reshape(1) / (2 * x.shape[0])
    return _feature_and_scale_grads(
        x, y, inv_x, inv_y, scale_f32, bias_f32, (row_max, row_logsum), (col_max, col_logsum), 0,
        coef, need_x, need_y, need_scale, (scale.shape, scale.dtype), options.normalize,
        options.allow_tf32, options.block or None)


triton_clip_loss_op = define_clip_loss_op("triton", triton_forward, triton_backward)


class TritonRows:
    """The row primitives of ``RowCrossEntropyFunction`` on the fused kernels."""

    name = "triton"

    def __init__(self, normalize: bool, allow_tf32: bool, panel):
        self.normalize = normalize
        self.allow_tf32 = allow_tf32
        self.panel = panel

    def prepare(self, queries, keys, scale, bias):
        scale_f32, bias_f32 = fp32_scalars(scale, bias)
        return (inverse_norms(queries, self.normalize), inverse_norms(keys, self.normalize),
                scale_f32, bias_f32)

    def stats(self, queries, keys, inv_q, inv_k, s, b, label_offset):
        row_max, row_sum, _, _, diag = block_stats(queries, keys, inv_q, inv_k, s, b,
                                                   label_offset, False, self.allow_tf32)
        return row_max, row_sum, diag

    def grads(self, queries, keys, inv_q, inv_k, s, b, row_stats, label_offset, coef, needs,
              scale_meta):
        return _feature_and_scale_grads(
            queries, keys, inv_q, inv_k, s, b, row_stats, None, label_offset, coef.reshape(1),
            *needs, scale_meta, self.normalize, self.allow_tf32, self.panel)


class TritonRowCrossEntropyFunction(RowCrossEntropyFunction):
    """``RowCrossEntropyFunction`` on the fused kernels (``panel``: the
    backward's panel side, None for the default)."""

    @staticmethod
    @without_autocast
    def forward(ctx, queries, keys, scale, bias, normalize: bool, label_offset: int,
                allow_tf32: bool, panel, extra_logits=None):
        return row_forward(ctx, TritonRows(normalize, allow_tf32, panel), queries, keys, scale,
                           bias, label_offset, extra_logits)


class TritonBlockOps:
    """The same operations with the fused Triton kernels (CUDA, or the interpreter)."""

    def __init__(self, x, y, normalize: bool, block: int, allow_tf32: bool = True):
        self.dtype = torch.float32
        self.normalize = normalize
        self.allow_tf32 = allow_tf32
        self.folded = folds_inv_norms(x, y, normalize)

    def inverse_norms(self, features):
        return inverse_norms(features, self.normalize)

    def scalars(self, scale, bias):
        return fp32_scalars(scale, bias)

    def stats(self, x, inv_x, y, inv_y, s, b, diag_offset, with_cols=True):
        return block_stats(x, y, inv_x, inv_y, s, b, diag_offset, with_cols, self.allow_tf32)

    def new_accumulator(self, rows, d, device):
        return torch.zeros(rows, d, dtype=torch.float32, device=device)

    def grads(self, x, inv_x, y, inv_y, s, b, row_stats, col_stats, diag_offset, x_acc, y_acc):
        """x_acc += G Y^, y_acc += G^T X^ (carrying the inverse norms when folded)."""
        return block_grads(
            x, y, inv_x, inv_y, s, b, row_stats, col_stats, diag_offset,
            normalize=self.normalize, allow_tf32=self.allow_tf32, panel=None,
            x_acc=x_acc, y_acc=y_acc)

    def finish(self, acc, features, inv_norm, s, coef):
        out = torch.empty(features.shape, dtype=features.dtype, device=features.device)
        factor = (s.reshape(1) * coef.reshape(1)).float().contiguous()
        finish_feature_grad(acc, features, inv_norm, factor, self.normalize, self.folded, out)
        return out
