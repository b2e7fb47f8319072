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

__all__ = [
    "TritonRowCrossEntropyFunction",
    "block_grads",
    "block_stats",
    "finish_feature_grad",
    "folds_inv_norms",
    "interpreter_active",
    "triton_clip_loss_op",
    "inverse_norms",
]
