"""Triton backend. Importing this package imports triton; callers guard it."""

from .clip_loss import TritonClipLossFunction, interpreter_active

__all__ = ["TritonClipLossFunction", "interpreter_active"]
