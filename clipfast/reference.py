"""Plain-PyTorch CLIP loss: the specification every other backend must match.

It builds the full N x N logit matrix, exactly as open_clip's ``ClipLoss`` does,
so its memory grows as N^2. It is the ground truth of the tests (run in
float64) and the "reference" provider of the benchmark.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


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
        normalize: L2-normalize the rows first (eps as ``F.normalize``).

    Returns:
        0-dim tensor, the mean of the image->text and text->image cross-entropies.
    """
    dtype = torch.promote_types(image_features.dtype, text_features.dtype)
    x = image_features.to(dtype)
    y = text_features.to(dtype)
    if normalize:
        x = F.normalize(x, dim=-1)
        y = F.normalize(y, dim=-1)
    scale = logit_scale.reshape(()).to(dtype)
    logits = scale * (x @ y.t())
    if logit_bias is not None:
        logits = logits + logit_bias.reshape(()).to(dtype)
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
