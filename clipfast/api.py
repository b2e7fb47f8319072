"""The public functional API: ``clip_loss`` and backend selection."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._inputs import LossInputs, ScaleLike, check_inputs, poison_invalid_scalars
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
    # Meta tensors only propagate shapes (each operator's fake implementation):
    # any backend accepts them, whatever device it computes on.
    shapes_only = device.type == "meta"
    if backend == "auto":
        if torch.compiler.is_compiling():
            n, d = inputs.image_features.shape
            return _auto_choice_constant(device.type, device.index, inputs.image_features.dtype,
                                         inputs.text_features.dtype, int(n), int(d))
        from .autoselect import choose

        return choose(inputs.image_features, inputs.text_features)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' needs the triton package (pip install triton); "
                "use backend='chunked' on machines without it"
            )
        if not shapes_only and not _triton_usable_on(device):
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

        _check_extension(extension)
        if device.type not in ("cpu", "meta"):
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
        if device.type != "cuda" and not emulated and not shapes_only:
            _check_extension(extension)
            raise ValueError(
                f"backend='cuda' needs CUDA tensors, got features on {device} (set "
                "CLIPFAST_CUDA_EMULATION=1 to run its kernels on CPU tensors through the "
                "slow CPU emulation, for tests)"
            )
        if not shapes_only:
            _check_extension(extension, device)
        dtypes = (inputs.image_features.dtype, inputs.text_features.dtype)
        if torch.float64 in dtypes:
            raise TypeError(
                f"backend='cuda' supports float16, bfloat16 and float32 features, got "
                f"image_features {dtypes[0]} and text_features {dtypes[1]}"
            )
    return backend


@torch.compiler.assume_constant_result
def _auto_choice_constant(device_type: str, device_index, image_dtype, text_dtype, n: int,
                          d: int) -> str:
    """``auto``'s choice while torch.compile traces: the same table lookup,
    evaluated once at trace time and baked into the graph (int(N) specialises
    the graph on the batch size, so a new batch size retraces and re-chooses)."""
    from .autoselect import explain

    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    return explain(device, (image_dtype, text_dtype), n, d).backend


def _check_extension(load, *args) -> None:
    """ImportError with the build instructions when a compiled extension is
    absent. Skipped while torch.compile traces (it cannot trace imports through
    importlib); the operator then raises the same error when it first runs."""
    if not torch.compiler.is_compiling():
        load(*args)


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
    labels: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    negative_features: Optional[torch.Tensor] = None,
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
        labels: optional (N,) integer group ids: pairs sharing a group are all
            positives (duplicate captions, several captions per image); the
            target spreads uniformly over them, in both directions. Any backend.
        label_smoothing: as ``F.cross_entropy``'s, in both directions. Any backend.
        negative_features: extra negative texts, (M, d) shared by every image
            or (N, k, d) per image; they join the image -> text softmax only.
            reference, chunked and triton (see ``clipfast.infonce``).

    Returns:
        0-dim tensor: float32 for float16/bfloat16 features (as under autocast),
        else the features' dtype. Gradients are returned in each input's dtype.
    """
    inputs = check_inputs(image_features, text_features, logit_scale, logit_bias)
    if labels is not None or label_smoothing or negative_features is not None:
        from .infonce import _check_options, info_nce_from_inputs, resolve_row_backend

        _check_options(inputs, negative_features, labels, label_smoothing)
        chosen = resolve_row_backend(backend, inputs, negative_features is not None)
        loss = info_nce_from_inputs(
            inputs, chosen, normalize=normalize, negative_features=negative_features,
            labels=labels, label_smoothing=label_smoothing, symmetric=True,
            allow_tf32=allow_tf32, chunk_elements=chunk_elements, panel_size=panel_size)
        return poison_invalid_scalars(loss.to(inputs.loss_dtype), inputs)
    chosen = resolve_backend(backend, inputs)
    if chosen == "reference":
        loss = reference_clip_loss(
            inputs.image_features, inputs.text_features, inputs.logit_scale,
            inputs.logit_bias, normalize)
    else:
        loss = fused_clip_loss_op(chosen)(
            inputs.image_features, inputs.text_features, inputs.logit_scale, inputs.logit_bias,
            bool(normalize), bool(allow_tf32), block_size(chosen, chunk_elements, panel_size))
    return poison_invalid_scalars(loss.to(inputs.loss_dtype), inputs)


def block_size(backend: str, chunk_elements: Optional[int], panel_size: Optional[int]) -> int:
    """The operators' ``block`` argument: chunk_elements for chunked, the panel
    side for triton, 0 (the default) otherwise or when not given."""
    if backend == "chunked" and chunk_elements is not None:
        return _positive_int("chunk_elements", chunk_elements)
    if backend == "triton" and panel_size is not None:
        return _positive_int("panel_size", panel_size)
    return 0


def fused_clip_loss_op(backend: str):
    """``op(x, y, scale, bias, normalize, allow_tf32, block) -> loss`` of a fused
    backend: its torch.library operator with autograd (see clipfast._ops)."""
    # Import statements, not importlib: torch.compile traces through them.
    if backend == "chunked":
        from .chunked import chunked_clip_loss_op as op
    elif backend == "triton":
        from ._triton.clip_loss import triton_clip_loss_op as op
    elif backend == "cpu":
        from .cpu_backend import cpu_clip_loss_op as op
    elif backend == "cuda":
        from .cuda_backend import cuda_clip_loss_op as op
    else:
        raise ValueError(f"no fused operator for backend {backend!r}")
    return op


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# Backends with a SigLIP operator.
SIGLIP_BACKENDS = ("reference", "chunked", "triton", "cpu", "cuda")


def _siglip_ops(backend: str):
    """{positives: op} of a fused backend's SigLIP operators (clipfast.siglip)."""
    # Import statements, not importlib: torch.compile traces through them.
    if backend == "chunked":
        from .siglip import chunked_siglip_ops as ops
    elif backend == "triton":
        from ._triton.siglip import triton_siglip_ops as ops
    elif backend == "cpu":
        from .cpu_backend import cpu_siglip_ops as ops
    elif backend == "cuda":
        from .cuda_backend import cuda_siglip_ops as ops
    else:
        raise ValueError(f"no SigLIP operator for backend {backend!r}")
    return ops


def resolve_siglip_backend(backend: str, inputs: LossInputs) -> str:
    """The backend ``siglip_loss`` runs: ``auto``'s CLIP choice when that
    backend has the SigLIP loss, else chunked; a named backend once it can run
    these inputs and has the loss."""
    chosen = resolve_backend(backend, inputs)
    if chosen in SIGLIP_BACKENDS:
        return chosen
    if backend == "auto":
        return "chunked"
    raise ValueError(
        f"backend={backend!r} has no SigLIP loss yet; the backends with it are "
        f"{', '.join(SIGLIP_BACKENDS)} (and 'auto')")


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: ScaleLike,
    logit_bias: Optional[ScaleLike] = None,
    *,
    normalize: bool = False,
    backend: str = "auto",
    allow_tf32: bool = True,
    chunk_elements: Optional[int] = None,
    panel_size: Optional[int] = None,
    positives: bool = True,
) -> torch.Tensor:
    """SigLIP's sigmoid loss without materialising the N x N logits.

    Equal to open_clip's ``SigLipLoss`` on one process: with logits
    ``L = logit_scale * X^ @ Y^.T + logit_bias`` and labels z = +1 on the
    diagonal, -1 elsewhere, ``-sum_ij logsigmoid(z_ij L_ij) / N``.

    Args:
        image_features: (N, d) tensor, float16 / bfloat16 / float32 (float64 on
            the reference and chunked backends).
        text_features: (N, d) tensor on the same device.
        logit_scale: the already-exponentiated scale s > 0 (a float, a 0-dim or
            a shape-[1] tensor); gradients flow to it.
        logit_bias: the bias b (SigLIP learns it; open_clip starts it at -10),
            or None for no bias. Its gradient is sum_ij dL/dL_ij (not zero).
        normalize: L2-normalise each row inside the op. False by default, as
            open_clip's loss (its models normalise their own features).
        backend: "auto" (auto's CLIP choice for these inputs), "reference",
            "chunked", "triton", "cpu" or "cuda" (see ``SIGLIP_BACKENDS``).
        allow_tf32: fp32 features may use TF32 tensor cores (fused GPU backends).
        chunk_elements: chunked backend only: logits held at once.
        panel_size: triton backend only: side of the backward's gradient panels.
        positives: False scores every pair as a negative (the blocks of the
            distributed loss against other ranks' texts).

    Returns:
        0-dim tensor: float32 for float16/bfloat16 features, else the features'
        dtype.
    """
    inputs = check_inputs(image_features, text_features, logit_scale, logit_bias)
    chosen = resolve_siglip_backend(backend, inputs)
    if chosen == "reference":
        from .siglip import reference_siglip_loss

        loss = reference_siglip_loss(inputs.image_features, inputs.text_features,
                                     inputs.logit_scale, inputs.logit_bias, normalize,
                                     positives=positives)
    else:
        loss = _siglip_ops(chosen)[bool(positives)](
            inputs.image_features, inputs.text_features, inputs.logit_scale, inputs.logit_bias,
            bool(normalize), bool(allow_tf32), block_size(chosen, chunk_elements, panel_size))
    return poison_invalid_scalars(loss.to(inputs.loss_dtype), inputs)
