"""Triton backend. Importing this package imports triton; callers guard it."""

from .clip_loss import (
    TritonRowCrossEntropyFunction,
    block_grads,
    block_stats,
    finish_feature_grad,
    folds_inv_norms,
    interpreter_active,
    triton_clip_loss_op,
    inverse_norms,
)
from .siglip import (
    siglip_block_grads,
    siglip_block_sum,
    triton_siglip_backward,
    triton_siglip_forward,
    triton_siglip_ops,
)

__all__ = [
    "TritonRowCrossEntropyFunction",
    "block_grads",
    "block_stats",
    "finish_feature_grad",
    "folds_inv_norms",
    "interpreter_active",
    "triton_clip_loss_op",
    "inverse_norms",
    "siglip_block_grads",
    "siglip_block_sum",
    "triton_siglip_backward",
    "triton_siglip_forward",
    "triton_siglip_ops",
]
