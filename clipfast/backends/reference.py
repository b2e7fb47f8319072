"""The reference backend: the plain-PyTorch CLIP and SigLIP losses, the
specification every other backend must match.

They build the full N x N logit matrix, exactly as open_clip's ``ClipLoss``
and ``SigLipLoss`` do, so their memory grows as N^2. It is the ground truth of the tests (run in
float64) and the "reference" provider of the benchmark.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ._base import HALF_AND_SINGLE, ROWS, SIGLIP, Backend

_NORM_EPS = 1e-12  # as F.normalize


def safe_normalize(x: torch.Tensor, eps: float = _NORM_EPS) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` without overflow or underflow in the norm.

    F.normalize squares the entries: fp32 rows past ~1e19 get an infinite norm
    and come back as zeros, so a loss of directions silently becomes log N.
    Here each row is first divided by a power of two near its largest entry.
    That division is exact, so wherever F.normalize's arithmetic stays in
    range the result is identical to it, bit for bit; the scale is a constant
    to autograd (x / max(|x|, eps) does not depend on it), so gradients and
    double backward are those of the formula. NaN or infinite rows give NaN.
    """
    amax = x.detach().abs().amax(dim=-1, keepdim=True)
    _, exponent = torch.frexp(amax)  # amax = m * 2^exponent, 0.5 <= m < 1
    usable = torch.isfinite(amax) & (amax > 0)
    one = torch.ones_like(amax)
    scale = torch.where(usable, torch.ldexp(one, exponent - 1), one)
    scaled = x / scale
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    # max(|x|, eps) / scale, with eps / scale exact: the clamp below eps kept.
    return scaled / torch.maximum(norm, eps / scale)


def _softmax_shift(logit_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bias as a constant added to every logit of a softmax.

    The cross-entropy is invariant to it, so d loss / d bias = sum of
    dL/dlogits = 0, but summing N^2 rounded terms leaves ~1e-8. The bias
    enters by value, and through autograd only as (bias - bias) * 0: its
    gradient is 0 * that sum, exactly zero, or NaN when the sum is.
    """
    bias = logit_bias.reshape(()).to(dtype)
    return bias.detach() + (bias - bias.detach()) * 0


def _softmax_logits(x, y, logit_scale, logit_bias, normalize: bool, extra_logits=None):
    """s * X^ Y^T (M x K), then ``extra_logits`` (M x k) as further columns, then
    the bias as a softmax shift, in the features' promoted dtype."""
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, y = x.to(dtype), y.to(dtype)
    if normalize:
        x, y = safe_normalize(x), safe_normalize(y)
    logits = logit_scale.reshape(()).to(dtype) * (x @ y.t())
    if extra_logits is not None:
        logits = torch.cat([logits, extra_logits.to(dtype)], dim=1)
    if logit_bias is not None:
        logits = logits + _softmax_shift(logit_bias, dtype)
    return logits


def reference_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Symmetric CLIP cross-entropy, computed in the features' (promoted) dtype.

    Args:
        image_features: (N, d) float tensor.
        text_features: (N, d) float tensor.
        logit_scale: 0-dim or shape-[1] tensor, already exponentiated (s > 0).
        logit_bias: optional 0-dim or shape-[1] tensor added to every logit.
            Its gradient is an exact zero (NaN where the loss's gradient with
            respect to the logits has a NaN), as the README promises.
        normalize: L2-normalize the rows first (eps as ``F.normalize``; the
            norms are computed without overflow, see ``safe_normalize``).

    Returns:
        0-dim tensor, the mean of the image->text and text->image cross-entropies.
        Twice differentiable.
    """
    logits = _softmax_logits(image_features, text_features, logit_scale, logit_bias, normalize)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


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


def reference_row_loss(queries, keys, logit_scale, logit_bias=None, normalize: bool = True,
                       label_offset: int = 0, extra_logits=None) -> torch.Tensor:
    """One direction of the CLIP loss over an M x K block: mean_i CE(row i,
    label i + label_offset), with ``extra_logits`` (M x k, without the bias)
    as further columns of each row alone (never labels)."""
    logits = _softmax_logits(queries, keys, logit_scale, logit_bias, normalize, extra_logits)
    labels = torch.arange(logits.shape[0], device=logits.device) + label_offset
    return F.cross_entropy(logits, labels)


class ReferenceBackend(Backend):
    name = "reference"
    summary = "plain PyTorch with the N x N logits, as open_clip: the specification"
    dtypes = HALF_AND_SINGLE + (torch.float64,)
    losses = frozenset({SIGLIP, ROWS})

    # Its entry points take the fused operators' arguments and ignore the
    # kernel options (allow_tf32, block, memory_budget: it keeps the N x N
    # logits whatever the budget).

    def clip_op(self):
        return (lambda x, y, scale, bias, normalize, allow_tf32=True, block=0, memory_budget=0.0:
                reference_clip_loss(x, y, scale, bias, normalize))

    def siglip_ops(self):
        return {positives: functools.partial(_siglip_as_op, positives=positives)
                for positives in (True, False)}

    def row_loss(self, normalize, allow_tf32, block, memory_budget=0.0):
        return lambda q, k, s, b, label_offset, extra: reference_row_loss(
            q, k, s, b, normalize, label_offset, extra)


def _siglip_as_op(x, y, scale, bias, normalize, allow_tf32=True, block=0, memory_budget=0.0, *,
                  positives):
    return reference_siglip_loss(x, y, scale, bias, normalize, positives=positives)


BACKEND = ReferenceBackend()
