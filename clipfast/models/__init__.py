"""Reference CLIP encoders for the examples and tests (small, CPU-friendly)."""

from .encoders import (
    CLIP,
    LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    TextTransformer,
    TinyResNet,
    TinyViT,
    build_clip,
)
from .tokenizer import CaptionTokenizer

__all__ = [
    "CLIP",
    "CaptionTokenizer",
    "LOGIT_SCALE_INIT",
    "LOGIT_SCALE_MAX",
    "TextTransformer",
    "TinyResNet",
    "TinyViT",
    "build_clip",
]
