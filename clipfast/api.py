"""The public functional API: ``clip_loss`` and backend selection."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._inputs import LossInputs, ScaleLike, check_inputs
from .chunked import chunked_clip_loss
from .reference import reference_clip_loss

BACKENDS = ("auto", "reference", "chunked", "triton", "cpu", "cuda")


def triton_available() -> bool:
    """True when triton imports (it does on Linux with a recent torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_usable_on(device: torch.device) -> bool:
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, inputs: LossInputs) -> str:
    """Map ``backend`` (possibly "auto") to the concrete backend that will run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = inputs.image_features.device
    if backend == "auto":
        from .autoselect import choose

        return choose(inputs.image_features, inputs.text_features)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' needs the triton package (pip install triton); "
                "use backend='chunked' on machines without it"
            )
        if not _triton_usable_on(device):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got features on {device} "
                "(set TRITON_INTERPRET=1 before importing triton to run the kernels "
                "on the CPU through Triton's interpreter)"
            )
        dtypes = (inputs.image_features.dtype, inputs.text_features.dtype)
        if torch.float64 in dtypes:
            raise TypeError(
                f"backend='triton' supports float16, bfloat16 and float32 features, got "
                f"image_features {dtypes[0]} and text_features {dtypes[1]}; use "
                "backend='chunked' or 'reference' for float64"
            )
    if backend == "cpu":
        from .cpu_backend import extension

        extension()  # ImportError with the build instructions when absent
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got features on {device}")
        dtypes = (inputs.image_features.dtype, inputs.text_features.dtype)
        if any(dt not in (torch.float32, torch.float64) for dt in dtypes):
            raise TypeError(
                f"backend='cpu' supports float32 and float64 features, got image_features "
                f"{dtypes[0]} and text_features {dtypes[1]}; use backend='chunked' for half precision"
            )
    if backend == "cuda":
        from .cuda_backend import emulation_enabled, extension

        emulated = device.type == "cpu" and emulation_enabled()
        if device.type != "cuda" and not emulated:
            extension()  # ImportError with the build instructions when absent
            raise ValueError(
                f"backend='cuda' needs CUDA tensors, got features on {device} (set "
                "CLIPFAST_CUDA_EMULATION=1 to run its kernels on CPU tensors through the "
                "slow CPU emulation, for tests)"
            )
        extension(device)  # ImportError with the build instructions when absent
        dtypes = (inputs.image_features.dtype, inputs.text_features.dtype)
        if torch.float64 in dtypes:
            raise TypeError(
                f"backend='cuda' supports float16, bfloat16 and float32 features, got "
                f"image_features {dtypes[0]} and text_features {dtypes[1]}"
            )
    return backend


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: ScaleLike,
    *,
    logit_bias: Optional[ScaleLike] = None,
    normalize: bool = True,
    backend: str = "auto",
    allow_tf32: bool = True,
    chunk_elements: Optional[int] = None,
    panel_size: Optional[int] = None,
) -> torch.Tensor:
    """Symmetric CLIP contrastive loss without materialising the N x N logits.

    Equal to open_clip's ``ClipLoss``: with logits
    ``L = logit_scale * X^ @ Y^.T (+ logit_bias)``, the mean of
    ``cross_entropy(L, arange(N))`` and ``cross_entropy(L.T, arange(N))``.

    Args:
        image_features: (N, d) tensor, float16 / bfloat16 / float32 (float64 on
            the reference and chunked backends).
        text_features: (N, d) tensor on the same device; its dtype may differ
            from ``image_features``'.
        logit_scale: the already-exponentiated scale s > 0 (open_clip passes
            ``logit_scale.exp()``): a Python float, a 0-dim or a shape-[1]
            tensor. Gradients flow to it when it requires grad.
        logit_bias: optional constant added to every logit (float or scalar
            tensor). The loss does not depend on it, so its gradient is an exact
            zero (NaN if the loss is NaN).
        normalize: L2-normalise each row inside the op (eps = 1e-12 as
            ``F.normalize``), forward and backward. Harmless for features that
            are already normalised.
        backend: "auto" (the fastest backend measured for this device type,
            dtype and nearest (N, d): see ``clipfast.autoselect``; triton for
            CUDA tensors and chunked otherwise where nothing was measured),
            "reference" (plain PyTorch, N x N memory), "chunked" (PyTorch,
            O(chunk * N) memory, any device), "triton" (fused kernels),
            "cpu" (the C++ backend, float32/float64 CPU tensors) or "cuda"
            (the CUDA C++ backend: tensor cores for float16/bfloat16 and, with
            ``allow_tf32``, float32).
        allow_tf32: triton and cuda backends: fp32 features use TF32 tensor
            cores (10-bit mantissa products, fp32 accumulation). False gives
            full fp32 (IEEE fp32 FMAs on the cuda backend, slower).
        chunk_elements: chunked backend only: logits held at once (default 2^22).
        panel_size: triton backend only: side of the gradient panels of the
            backward pass, rounded up to a multiple of the tile size (default
            about sqrt(N d / 8), between 2048 and 8192, at most about N/2).

    Returns:
        0-dim tensor: float32 for float16/bfloat16 features (as under autocast),
        else the features' dtype. Gradients are returned in each input's dtype.
    """
    inputs = check_inputs(image_features, text_features, logit_scale, logit_bias)
    chosen = resolve_backend(backend, inputs)
    if chosen == "reference":
        loss = reference_clip_loss(
            inputs.image_features, inputs.text_features, inputs.logit_scale,
            inputs.logit_bias, normalize)
    elif chosen == "chunked":
        loss = chunked_clip_loss(inputs, normalize=normalize, chunk_elements=chunk_elements)
    elif chosen == "cpu":
        from .cpu_backend import cpu_clip_loss

        loss = cpu_clip_loss(inputs, normalize=normalize)
    elif chosen == "cuda":
        from .cuda_backend import cuda_clip_loss

        loss = cuda_clip_loss(inputs, normalize=normalize, allow_tf32=allow_tf32)
    else:
        from ._triton import TritonClipLossFunction

        loss = TritonClipLossFunction.apply(
            inputs.image_features, inputs.text_features, inputs.logit_scale,
            inputs.logit_bias, bool(normalize), bool(allow_tf32), panel_size)
    return loss.to(inputs.loss_dtype)
