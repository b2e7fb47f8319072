"""clipfast: fused, linear-memory CLIP contrastive loss."""

from .api import BACKENDS, clip_loss, resolve_backend, triton_available
from .modules import ClipLoss, CoCaLoss, DistillClipLoss
from .reference import reference_clip_loss

__all__ = [
    "BACKENDS",
    "ClipLoss",
    "CoCaLoss",
    "DistillClipLoss",
    "clip_loss",
    "reference_clip_loss",
    "resolve_backend",
    "triton_available",
]
__version__ = "0.1.0"
