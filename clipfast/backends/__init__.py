"""The backends and their registry.

One module or folder per backend, each declaring one ``Backend`` (see
``_base``): what it runs, why not when it cannot, and its entry points.

    reference   plain PyTorch, N x N logits: the specification
    chunked     PyTorch in row chunks, any device and dtype
    triton/     fused Triton kernels (CUDA; CPU through the interpreter)
    hybrid/     cuBLAS panel products + Triton epilogues (CUDA; CPU likewise)
    cpu         C++ CPU kernels (the clipfast._cpu extension, csrc/cpu)
    cuda        CUDA C++ kernels (clipfast._cuda, csrc/cuda; CPU emulation)

Shared by them: ``_ops`` (the torch.library operator factory every fused
backend registers through), ``_stats`` (softmax-statistics merges). Adding a
backend is one module here plus one line in ``REGISTRY``. Choosing among
them (``auto``, fallbacks) is ``clipfast.dispatch``'s job.
"""

from __future__ import annotations

from typing import Dict, Tuple

from . import chunked, cpu, cuda, hybrid, reference, triton
from ._base import BLOCKS, LOSS_DESCRIPTIONS, ROWS, SIGLIP, Backend

REGISTRY: Dict[str, Backend] = {
    backend.BACKEND.name: backend.BACKEND for backend in (reference, chunked, triton, hybrid, cpu, cuda)
}

__all__ = ["BLOCKS", "LOSS_DESCRIPTIONS", "REGISTRY", "ROWS", "SIGLIP", "Backend", "get",
           "with_loss"]


def get(name: str) -> Backend:
    return REGISTRY[name]


def with_loss(loss: str) -> Tuple[str, ...]:
    """Names of the backends that have ``loss`` (SIGLIP, ROWS or BLOCKS)."""
    return tuple(name for name, backend in REGISTRY.items() if backend.has(loss))
