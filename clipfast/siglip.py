"""SigLIP's sigmoid loss: the plain-PyTorch reference, the chunked backend and
the operator factory every SigLIP backend registers through.

With logits ``L = s * X^ @ Y^.T + b`` (X^, Y^ the rows, L2-normalised when
``normalize``) and labels z = +1 on the positive pairs (i, i) and -1
elsewhere, the loss is ``-sum_ij logsigmoid(z_ij L_ij) / N``: open_clip's
``SigLipLoss`` on one process. Its gradient with respect to the logits is
``G_ij = -z_ij sigmoid(-z_ij L_ij) / N``, so

    dX^ = s G Y^,  dY^ = s G^T X^,  ds = sum G * (X^ Y^T),  db = sum G.

No softmax statistics are involved: forward and backward are each one sweep
over the logits, and the backward saves only the inverse norms. The
distributed form (``clipfast.modules.SigLipLoss`` with world_size > 1) adds
blocks of logits against other ranks' texts with no positives, which is the
``positives=False`` variant of every function here.
"""

import functools
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ._ops import KernelOptions, LossSpec, compute_dtype, define_loss_op

SIGLIP_STATS_ROWS = 2  # inv_x, inv_y


def siglip_labels(n: int, k: int, positives: bool, dtype, device) -> torch.Tensor:
    """z: +1 on (i, i) when ``positives``, -1 everywhere else (n x k)."""
    labels = -torch.ones(n, k, dtype=dtype, device=device)
    if positives:
        labels.diagonal().fill_(1.0)
    return labels


def reference_siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor] = None,
    normalize: bool = False,
    positives: bool = True,
) -> torch.Tensor:
    """SigLIP's loss in plain PyTorch, N x K logits in the features' dtype.

    Args:
        image_features: (N, d) float tensor.
        text_features: (K, d) float tensor (K = N with positives).
        logit_scale: 0-dim or shape-[1] tensor, already exponentiated.
        logit_bias: optional 0-dim or shape-[1] tensor added to every logit.
        normalize: L2-normalise the rows first.
        positives: label (i, i) positive; False gives the all-negative block of
            the distributed loss.

    Returns:
        0-dim tensor ``-sum logsigmoid(z * L) / N``.
    """
    dtype = torch.promote_types(image_features.dtype, text_features.dtype)
    x, y = image_features.to(dtype), text_features.to(dtype)
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = logit_scale.reshape(()).to(dtype) * (x @ y.t())
    if logit_bias is not None:
        logits = logits + logit_bias.reshape(()).to(dtype)
    labels = siglip_labels(x.shape[0], y.shape[0], positives, dtype, x.device)
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]


# --------------------------------------------------------------------------- #
# The chunked backend: row chunks of the logits, O(chunk * N) memory.
# --------------------------------------------------------------------------- #


def _rows(n: int, k: int, chunk_elements: int) -> int:
    return max(1, min(n, chunk_elements // max(k, 1)))


def _chunk_logits(x_unit, y_unit, scale, bias, start, stop, positives):
    cos = x_unit[start:stop] @ y_unit.t()
    logits = scale * cos
    if bias is not None:
        logits = logits + bias
    labels = siglip_labels(stop - start, y_unit.shape[0], False, logits.dtype, logits.device)
    if positives:
        labels.diagonal(offset=start).fill_(1.0)
    return cos, logits, labels


def siglip_block_sum(x_unit, y_unit, scale, bias, positives: bool, chunk_elements: int):
    """sum_ij -logsigmoid(z_ij L_ij) over one block, in row chunks."""
    total = torch.zeros((), dtype=x_unit.dtype, device=x_unit.device)
    rows = _rows(x_unit.shape[0], y_unit.shape[0], chunk_elements)
    for start in range(0, x_unit.shape[0], rows):
        stop = min(x_unit.shape[0], start + rows)
        _, logits, labels = _chunk_logits(x_unit, y_unit, scale, bias, start, stop, positives)
        total = total - F.logsigmoid(labels * logits).sum()
    return total


def siglip_block_backward(x_unit, y_unit, scale, bias, positives: bool, coef, chunk_elements: int,
                          need_x: bool = True, need_y: bool = True):
    """(dX^, dY^, sum G cos, sum G) of ``coef`` x the block's loss sum."""
    rows = _rows(x_unit.shape[0], y_unit.shape[0], chunk_elements)
    grad_x = torch.empty_like(x_unit) if need_x else None
    grad_y = torch.zeros_like(y_unit) if need_y else None
    grad_s = torch.zeros((), dtype=x_unit.dtype, device=x_unit.device)
    grad_b = torch.zeros((), dtype=x_unit.dtype, device=x_unit.device)
    for start in range(0, x_unit.shape[0], rows):
        stop = min(x_unit.shape[0], start + rows)
        cos, logits, labels = _chunk_logits(x_unit, y_unit, scale, bias, start, stop, positives)
        # d/dL of -logsigmoid(z L) = -z sigmoid(-z L); sigmoid is stable both ways.
        grad_logits = -labels * torch.sigmoid(-labels * logits) * coef
        grad_s += (grad_logits * cos).sum()
        grad_b += grad_logits.sum()
        if need_x:
            grad_x[start:stop] = scale * (grad_logits @ y_unit)
        if need_y:
            grad_y += scale * (grad_logits.t() @ x_unit[start:stop])
    return grad_x, grad_y, grad_s, grad_b


def _prepared(x, y, scale, bias, options: KernelOptions):
    from .chunked import inverse_norms, scalar_in, unit_rows

    dtype = compute_dtype(x, y)
    inv_x = inverse_norms(x, options.normalize, dtype)
    inv_y = inverse_norms(y, options.normalize, dtype)
    return (unit_rows(x, inv_x), unit_rows(y, inv_y), inv_x, inv_y, scalar_in(scale, dtype),
            scalar_in(bias, dtype))


def _chunk(block: int) -> int:
    from .chunked import DEFAULT_CHUNK_ELEMENTS

    return DEFAULT_CHUNK_ELEMENTS if block == 0 else block


def chunked_siglip_forward(x, y, scale, bias, options: KernelOptions, positives: bool = True):
    """(loss, stats = [inv_x, inv_y]) (see ``clipfast._ops``)."""
    x_unit, y_unit, inv_x, inv_y, s, b = _prepared(x, y, scale, bias, options)
    total = siglip_block_sum(x_unit, y_unit, s, b, positives, _chunk(options.block))
    return total / x.shape[0], torch.stack([inv_x, inv_y])


def chunked_siglip_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                            need_x: bool, need_y: bool, need_scale: bool, need_bias: bool,
                            positives: bool = True):
    from .chunked import features_grad

    x_unit, y_unit, inv_x, inv_y, s, b = _prepared(x, y, scale, bias, options)
    coef = grad_loss.to(x_unit.dtype) / x.shape[0]
    grad_x_unit, grad_y_unit, grad_s, grad_b = siglip_block_backward(
        x_unit, y_unit, s, b, positives, coef, _chunk(options.block), need_x, need_y)
    return (features_grad(grad_x_unit, x, inv_x, options.normalize) if need_x else None,
            features_grad(grad_y_unit, y, inv_y, options.normalize) if need_y else None,
            grad_s.reshape(scale.shape).to(scale.dtype) if need_scale else None,
            grad_b.reshape(bias.shape).to(bias.dtype) if need_bias and bias is not None else None)


# --------------------------------------------------------------------------- #
# Operators: one with positives on the diagonal, one with none.
# --------------------------------------------------------------------------- #

SIGLIP = LossSpec("siglip", SIGLIP_STATS_ROWS, reference_siglip_loss, kernel_bias_grad=True)
SIGLIP_NEGATIVES = LossSpec(
    "siglip_negatives", SIGLIP_STATS_ROWS,
    functools.partial(reference_siglip_loss, positives=False), kernel_bias_grad=True)


def define_siglip_ops(backend: str, forward: Callable, backward: Callable) -> Dict[bool, Callable]:
    """Register a backend's SigLIP operators from ``forward(..., positives)``
    and ``backward(..., positives)``; returns {positives: op}."""
    return {
        positives: define_loss_op(spec, backend, functools.partial(forward, positives=positives),
                                  functools.partial(backward, positives=positives))
        for positives, spec in ((True, SIGLIP), (False, SIGLIP_NEGATIVES))
    }


chunked_siglip_ops = define_siglip_ops("chunked", chunked_siglip_forward, chunked_siglip_backward)
