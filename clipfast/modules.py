"""``nn.Module`` wrappers around the functional API."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .api import clip_loss


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss`` backed by the fused kernels.

    The constructor takes open_clip's arguments (``use_horovod`` is accepted and
    ignored) plus clipfast's ``backend`` and ``normalize``. ``forward`` returns
    the loss, or ``{"contrastive_loss": loss}`` with ``output_dict=True``, so
    ``loss_fn(**model_out, output_dict=True)`` works as in open_clip.

    ``normalize=True`` (the default) re-normalises the features inside the op;
    for open_clip's already-normalised features this changes nothing.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
        normalize: bool = True,
    ):
        super().__init__()
        if world_size > 1:
            raise NotImplementedError(
                f"clipfast.ClipLoss with world_size={world_size}: distributed modes "
                "(local_loss / gather_with_grad) are not implemented yet; compute the "
                "loss on gathered features with world_size=1 meanwhile"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        # Labels are arange(N) inside the kernels; nothing to cache.
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.normalize = normalize

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias: Optional[torch.Tensor] = None,
        output_dict: bool = False,
    ):
        loss = clip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias=logit_bias,
            normalize=self.normalize,
            backend=self.backend,
        )
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, normalize={self.normalize}"
