"""The SigLIP loss through the fused Triton kernels (``triton_siglip_ops``).

With logits ``L = s X^ Y^T + b`` and labels z = +1 on (i, i) (``positives``),
-1 elsewhere, the loss is ``sum_ij softplus(-z_ij L_ij) / N`` and its
gradient with respect to the logits ``W_ij / N`` with
``W = -z sigmoid(-z L)``, |W| <= 1 (see ``clipfast.backends._ops``). No
softmax statistics exist: the forward is one softplus sum
(``_siglip_forward_kernel``), the backward the CLIP backward's panel loop
with W for G (``_siglip_grad_kernel``). Only autograd and bookkeeping live
here; kernels in ``forward_kernels`` / ``backward_kernels``, their launches
in ``launchers``.
"""

from __future__ import annotations

import functools

import torch

from .._ops import KernelOptions, compute_dtype, define_siglip_ops
from .launchers import (feature_grads, fp32_scalars, inverse_norms, panel_scale,
                        siglip_block_grads, siglip_block_sum)


def triton_siglip_forward(x, y, scale, bias, options: KernelOptions, positives: bool = True):
    """(loss, stats = [inv_x, inv_y]) through the fused kernels (see
    ``clipfast.backends._ops``)."""
    scale_f32, bias_f32 = fp32_scalars(scale, bias)
    inv_x, inv_y = inverse_norms(x, options.normalize), inverse_norms(y, options.normalize)
    total = siglip_block_sum(x, y, inv_x, inv_y, scale_f32, bias_f32, positives,
                             normalize=options.normalize, allow_tf32=options.allow_tf32)
    dtype = compute_dtype(x, y)
    return (total / x.shape[0]).to(dtype), torch.stack([inv_x, inv_y]).to(dtype)


def triton_siglip_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                           need_x: bool, need_y: bool, need_scale: bool, need_bias: bool,
                           positives: bool = True):
    inv_x, inv_y = stats[0].float().contiguous(), stats[1].float().contiguous()
    scale_f32, bias_f32 = fp32_scalars(scale, bias)
    need_bias = need_bias and bias is not None
    # The loss is the block's sum / N: every gradient carries grad_loss / N.
    coef = grad_loss.detach().float().reshape(1) / x.shape[0]
    factor = (scale_f32 * coef).contiguous()
    grad_x, grad_y, (scale_sum, bias_sum) = feature_grads(
        x, y, inv_y, factor, need_x, need_y, options.normalize,
        functools.partial(siglip_block_grads, x, y, inv_x, inv_y, scale_f32, bias_f32, positives,
                          normalize=options.normalize, allow_tf32=options.allow_tf32,
                          panel=options.block or None),
        y_unscale=panel_scale(x, y))
    coef64 = grad_loss.detach().double().reshape(()) / x.shape[0]
    grad_scale = (scale_sum * coef64).reshape(scale.shape).to(scale.dtype) if need_scale else None
    grad_bias = (bias_sum * coef64).reshape(bias.shape).to(bias.dtype) if need_bias else None
    return grad_x, grad_y, grad_scale, grad_bias


triton_siglip_ops = define_siglip_ops("triton", triton_siglip_forward, triton_siglip_backward)
