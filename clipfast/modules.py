"""``nn.Module`` wrappers around the functional API."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ._inputs import check_inputs
from .api import clip_loss
from .distributed import distributed_clip_loss, mode_warning


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss`` backed by the fused kernels.

    The constructor takes open_clip's arguments plus clipfast's ``backend``,
    ``normalize``, ``ring`` and ``group``. With ``world_size > 1`` it runs on
    torch.distributed: open_clip's gather modes, or ``ring=True``, which never
    holds all ranks' features (see ``clipfast.distributed`` for the modes and
    the gradient convention). ``forward`` returns
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
        ring: bool = False,
        group=None,
    ):
        super().__init__()
        if use_horovod:
            warnings.warn("ClipLoss(use_horovod=True): horovod is not supported and the flag is "
                          "ignored; the distributed modes run on torch.distributed", stacklevel=2)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if ring and local_loss:
            raise ValueError("ring=True computes the global loss; it cannot be combined with local_loss=True")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        # Labels are arange(N) (offset by rank) inside the kernels; nothing to cache.
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.normalize = normalize
        self.ring = ring
        self.group = group
        message = mode_warning(local_loss, gather_with_grad, ring, world_size)
        if message is not None:
            warnings.warn(message, stacklevel=2)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias: Optional[torch.Tensor] = None,
        output_dict: bool = False,
    ):
        if self.world_size > 1:
            inputs = check_inputs(image_features, text_features, logit_scale, logit_bias)
            loss = distributed_clip_loss(
                inputs, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                ring=self.ring, rank=self.rank, world_size=self.world_size,
                normalize=self.normalize, backend=self.backend, group=self.group)
            loss = loss.to(inputs.loss_dtype)
        else:
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
        text = f"backend={self.backend!r}, normalize={self.normalize}"
        if self.world_size > 1:
            text += (f", rank={self.rank}, world_size={self.world_size}, local_loss={self.local_loss}, "
                     f"gather_with_grad={self.gather_with_grad}, ring={self.ring}")
        return text
