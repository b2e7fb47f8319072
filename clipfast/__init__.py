"""clipfast: fused, linear-memory CLIP contrastive loss."""

from .api import BACKENDS, clip_loss, resolve_backend, siglip_loss, triton_available
from .infonce import info_nce_loss
from .modules import ClipLoss, CoCaLoss, DistillClipLoss, SigLipLoss
from .backends.reference import reference_clip_loss, reference_siglip_loss

__all__ = [
    "BACKENDS",
    "ClipLoss",
    "CoCaLoss",
    "DistillClipLoss",
    "SigLipLoss",
    "clip_loss",
    "info_nce_loss",
    "reference_clip_loss",
    "reference_siglip_loss",
    "resolve_backend",
    "siglip_loss",
    "triton_available",
]
__version__ = "0.1.0"
