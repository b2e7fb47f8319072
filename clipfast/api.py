"""The public functional API: ``clip_loss`` and ``siglip_loss``.

A call validates its inputs once (``clipfast._inputs``), asks
``clipfast.dispatch`` which backend runs them, and calls that backend's
operator (``clipfast.backends``). ``ClipLoss`` / ``SigLipLoss`` and the
distributed modes validate at their own boundary and enter at the
``*_from_inputs`` functions below.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import (LossInputs, ScaleLike, check_inputs, check_memory_budget, poison_invalid_scalars,
                      resolve_tf32)
from .backends import SIGLIP
from .backends.triton import triton_available
from .dispatch import BACKENDS, resolve, resolve_backend

__all__ = ["BACKENDS", "clip_loss", "clip_loss_from_inputs", "resolve_backend", "siglip_loss",
           "siglip_loss_from_inputs", "triton_available"]


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: ScaleLike,
    *,
    logit_bias: Optional[ScaleLike] = None,
    normalize: bool = True,
    backend: str = "auto",
    allow_tf32: Optional[bool] = None,
    chunk_elements: Optional[int] = None,
    panel_size: Optional[int] = None,
    labels: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    negative_features: Optional[torch.Tensor] = None,
    memory_budget: Optional[float] = None,
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
            ``logit_scale.exp()``): a number (Python or numpy) or a
            one-element tensor (0-dim, [1], [1, 1]). Gradients flow to it when
            it requires grad, in its own shape.
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
            "hybrid" (cuBLAS panel products with fp32 logits, Triton epilogues),
            "cpu" (the C++ backend, float32/float64 CPU tensors) or "cuda"
            (the CUDA C++ backend: tensor cores for float16/bfloat16 and, with
            ``allow_tf32``, float32). ``clipfast.backends`` lists them.
        allow_tf32: whether fp32 features may use TF32 tensor cores (10-bit
            mantissa products, fp32 accumulation) on the GPU backends (triton,
            hybrid, cuda). None (default): follow torch's setting,
            ``torch.backends.cuda.matmul.allow_tf32`` (on after
            ``torch.set_float32_matmul_precision("high")``; off by default),
            read at each call. False gives full fp32 (IEEE fp32 FMAs on the
            cuda backend, slower).
        chunk_elements: chunked backend only: logits held at once (default 2^22).
        panel_size: triton backend: side of the gradient panels of the
            backward pass, rounded up to a multiple of the tile size (default
            about sqrt(N d / 8), between 2048 and 8192, at most about N/2);
            hybrid backend: rows per logits panel (default about 2^27 / N,
            at least 256: one fp32 panel of at most ~512 MB).
        labels: optional (N,) integer group ids: pairs sharing a group are all
            positives (duplicate captions, several captions per image); the
            target spreads uniformly over them, in both directions. Any backend.
        label_smoothing: as ``F.cross_entropy``'s, in both directions. Any backend.
        negative_features: extra negative texts, (M, d) shared by every image
            or (N, k, d) per image; they join the image -> text softmax only.
            reference, chunked, triton and hybrid (see ``clipfast.infonce``).
        memory_budget: bytes the forward may keep alive for the backward
            beyond its O(N) statistics (None: nothing, every logits panel is
            recomputed; ``float("inf")``: everything). The hybrid and chunked
            backends keep as many fp32 (chunked: compute-dtype) panels of
            dot products as fit, and their backward skips those GEMMs; the
            result is the same to the bit. Other backends ignore it.

    Returns:
        0-dim tensor: float32 for float16/bfloat16 features (as under autocast),
        else the features' dtype. Gradients are returned in each input's dtype.
    """
    inputs = check_inputs(image_features, text_features, logit_scale, logit_bias)
    return clip_loss_from_inputs(
        inputs, normalize=normalize, backend=backend, allow_tf32=allow_tf32,
        chunk_elements=chunk_elements, panel_size=panel_size, labels=labels,
        label_smoothing=label_smoothing, negative_features=negative_features,
        memory_budget=memory_budget)


def clip_loss_from_inputs(inputs: LossInputs, *, normalize: bool = True, backend: str = "auto",
                          allow_tf32: Optional[bool] = None, chunk_elements: Optional[int] = None,
                          panel_size: Optional[int] = None, labels: Optional[torch.Tensor] = None,
                          label_smoothing: float = 0.0,
                          negative_features: Optional[torch.Tensor] = None,
                          memory_budget: Optional[float] = None) -> torch.Tensor:
    """``clip_loss`` on inputs already validated by ``check_inputs``."""
    budget = check_memory_budget(memory_budget)
    allow_tf32 = resolve_tf32(allow_tf32)
    if labels is not None or label_smoothing or negative_features is not None:
        from .infonce import info_nce_from_inputs

        return info_nce_from_inputs(
            inputs, backend, normalize=normalize, negative_features=negative_features,
            labels=labels, label_smoothing=label_smoothing, symmetric=True,
            allow_tf32=allow_tf32, chunk_elements=chunk_elements, panel_size=panel_size,
            memory_budget=memory_budget)
    chosen = resolve(backend, inputs)
    loss = chosen.clip_op()(
        inputs.image_features, inputs.text_features, inputs.logit_scale, inputs.logit_bias,
        bool(normalize), allow_tf32, chosen.block(chunk_elements, panel_size), budget)
    return poison_invalid_scalars(loss.to(inputs.loss_dtype), inputs)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: ScaleLike,
    logit_bias: Optional[ScaleLike] = None,
    *,
    normalize: bool = False,
    backend: str = "auto",
    allow_tf32: Optional[bool] = None,
    chunk_elements: Optional[int] = None,
    panel_size: Optional[int] = None,
    positives: bool = True,
    memory_budget: Optional[float] = None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss without materialising the N x N logits.

    Equal to open_clip's ``SigLipLoss`` on one process: with logits
    ``L = logit_scale * X^ @ Y^.T + logit_bias`` and labels z = +1 on the
    diagonal, -1 elsewhere, ``-sum_ij logsigmoid(z_ij L_ij) / N``.

    Args:
        image_features: (N, d) tensor, float16 / bfloat16 / float32 (float64 on
            the reference and chunked backends).
        text_features: (N, d) tensor on the same device.
        logit_scale: the already-exponentiated scale s > 0 (a number or a
            one-element tensor); gradients flow to it.
        logit_bias: the bias b (SigLIP learns it; open_clip starts it at -10),
            or None for no bias. Its gradient is sum_ij dL/dL_ij (not zero).
        normalize: L2-normalise each row inside the op. False by default, as
            open_clip's loss (its models normalise their own features).
        backend: "auto" (auto's CLIP choice for these inputs), "reference",
            "chunked", "triton", "hybrid", "cpu" or "cuda" (every backend has it).
        allow_tf32: as ``clip_loss``'s (None: follow torch's TF32 setting).
        chunk_elements: chunked backend only: logits held at once.
        panel_size: triton backend: side of the backward's gradient panels;
            hybrid backend: rows per logits panel.
        positives: False scores every pair as a negative (the blocks of the
            distributed loss against other ranks' texts).
        memory_budget: as ``clip_loss``'s (hybrid and chunked keep panels).

    Returns:
        0-dim tensor: float32 for float16/bfloat16 features, else the features'
        dtype.
    """
    inputs = check_inputs(image_features, text_features, logit_scale, logit_bias)
    return siglip_loss_from_inputs(
        inputs, normalize=normalize, backend=backend, allow_tf32=allow_tf32,
        chunk_elements=chunk_elements, panel_size=panel_size, positives=positives,
        memory_budget=memory_budget)


def siglip_loss_from_inputs(inputs: LossInputs, *, normalize: bool = False, backend: str = "auto",
                            allow_tf32: Optional[bool] = None, chunk_elements: Optional[int] = None,
                            panel_size: Optional[int] = None,
                            positives: bool = True,
                            memory_budget: Optional[float] = None) -> torch.Tensor:
    """``siglip_loss`` on inputs already validated by ``check_inputs``."""
    budget = check_memory_budget(memory_budget)
    chosen = resolve(backend, inputs, SIGLIP)
    loss = chosen.siglip_ops()[bool(positives)](
        inputs.image_features, inputs.text_features, inputs.logit_scale, inputs.logit_bias,
        bool(normalize), resolve_tf32(allow_tf32), chosen.block(chunk_elements, panel_size), budget)
    return poison_invalid_scalars(loss.to(inputs.loss_dtype), inputs)
