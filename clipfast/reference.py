"""Plain-PyTorch CLIP loss: the specification every other backend must match.

It builds the full N x N logit matrix, exactly as open_clip's ``ClipLoss`` does,
so its memory grows as N^2. It is the ground truth of the tests (run in
float64) and the "reference" provider of the benchmark.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

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
    dtype = torch.promote_types(image_features.dtype, text_features.dtype)
    x = image_features.to(dtype)
    y = text_features.to(dtype)
    if normalize:
        x = safe_normalize(x)
        y = safe_normalize(y)
    scale = logit_scale.reshape(()).to(dtype)
    logits = scale * (x @ y.t())
    if logit_bias is not None:
        bias = logit_bias.reshape(()).to(dtype)
        # The cross-entropy is invariant to a constant added to every logit,
        # so d loss / d bias = sum of dL/dlogits = 0, but summing N^2 rounded
        # terms leaves ~1e-8. The bias enters the logits by value, and through
        # autograd only as (bias - bias) * 0: its gradient is 0 * that sum,
        # exactly zero, or NaN when the sum is.
        logits = logits + (bias.detach() + (bias - bias.detach()) * 0)
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
