"""clipfast: fused, linear-memory CLIP contrastive loss."""

from .api import BACKENDS, clip_loss, resolve_backend, triton_available
from .modules import ClipLoss
from .reference import reference_clip_loss

__all__ = [
    "BACKENDS",
    "ClipLoss",
    "clip_loss",
    "reference_clip_loss",
    "resolve_backend",
    "triton_available",
]
__version__ = "0.1.0"
