"""Triton backend. Importing this package imports triton; callers guard it."""

from .clip_loss import (
    TritonClipLossFunction,
    TritonRowCrossEntropyFunction,
    block_grads,
    block_stats,
    finish_feature_grad,
    folds_inv_norms,
    interpreter_active,
    inverse_norms,
)

__all__ = [
    "TritonClipLossFunction",
    "TritonRowCrossEntropyFunction",
    "block_grads",
    "block_stats",
    "finish_feature_grad",
    "folds_inv_norms",
    "interpreter_active",
    "inverse_norms",
]
