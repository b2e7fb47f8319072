"""Whether and where the Triton kernels can run, without importing triton
unless asked."""

from __future__ import annotations

import os

import torch


def triton_available() -> bool:
    """True when triton imports (it does on Linux with a recent torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_requested() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable_on(device: torch.device) -> bool:
    """Whether the kernels run on tensors of ``device`` here (CUDA, or the
    CPU under the interpreter)."""
    if not triton_available():
        return False
    return device.type == "cuda" or interpreter_requested()
