"""Validation and canonicalisation of the loss inputs, shared by every backend.

Backends receive features that are known to be 2-D, floating point, on one
device and of matching shape, and a ``logit_scale`` / ``logit_bias`` that are
always tensors on that device (a Python float becomes a constant tensor).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

# A Python or numpy number, or a one-element tensor of any shape (0-dim,
# [1], [1, 1]: open_clip keeps logit_scale as a 0-dim parameter, others as
# [1] or [1, 1]).
ScaleLike = Union[float, int, numbers.Real, torch.Tensor]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class LossInputs:
    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: Optional[torch.Tensor]
    # False when the scale/bias values could not be read on the host (under
    # torch.compile, or meta tensors): the caller then poisons the loss on the
    # device instead (see ``poison_invalid_scalars``).
    values_checked: bool = True
    # The caller's names for the two feature arguments, for error messages.
    names: Tuple[str, str] = ("image_features", "text_features")

    @property
    def feature_dtype(self) -> torch.dtype:
        """The dtype PyTorch would compute the similarity in."""
        return torch.promote_types(self.image_features.dtype, self.text_features.dtype)

    @property
    def loss_dtype(self) -> torch.dtype:
        """fp32 for half-precision features (as under autocast), else the feature dtype."""
        return torch.promote_types(self.feature_dtype, torch.float32)


def _check_features(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)} ({t.dim()}-D)"
        )
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )


def _as_scalar_tensor(name: str, value, device: torch.device, dtype: torch.dtype):
    """A number or a one-element tensor as a tensor on ``device`` (a tensor is
    returned as it is, so its gradient reaches it in its own shape)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar: a number or a one-element tensor (0-dim, [1], "
                f"[1, 1]), got a tensor of shape {tuple(value.shape)}")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(
                f"{name} is on {value.device} but the features are on {device}"
            )
        return value
    # numbers.Real: Python int/float and numpy's scalars (numpy.float32 is not
    # a float subclass); 0-dim numpy arrays go through .item().
    if type(value).__name__ == "ndarray" and getattr(value, "size", 0) == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number or a one-element tensor, got {type(value).__name__}"
        )
    return torch.tensor(float(value), dtype=dtype, device=device)


def resolve_tf32(allow_tf32: Optional[bool]) -> bool:
    """Whether fp32 products may round their inputs to TF32: ``allow_tf32``
    when given, else torch's own setting (``torch.backends.cuda.matmul.allow_tf32``,
    which ``torch.set_float32_matmul_precision("high")`` turns on; off by
    default, as in torch). Read at each call, so a module built before the
    setting changes follows it."""
    if allow_tf32 is None:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be True, False or None (follow torch's setting), "
                        f"got {type(allow_tf32).__name__}")
    return allow_tf32


def check_memory_budget(memory_budget) -> float:
    """``memory_budget`` (bytes the forward may keep for the backward; None:
    none) as the operators take it: a float >= 0, inf for everything."""
    if memory_budget is None:
        return 0.0
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise TypeError(f"memory_budget must be a number of bytes (int or float, inf for "
                        f"everything) or None, got {type(memory_budget).__name__}")
    value = float(memory_budget)
    if math.isnan(value) or value < 0:
        raise ValueError(f"memory_budget must be >= 0 bytes (or None, or float('inf')), got "
                         f"{memory_budget!r}")
    return value


def check_inputs(
    image_features,
    text_features,
    logit_scale: ScaleLike,
    logit_bias: Optional[ScaleLike] = None,
    *,
    names: Tuple[str, str] = ("image_features", "text_features"),
) -> LossInputs:
    """Validate the loss inputs; raise ValueError/TypeError naming the bad
    argument (``names``: the caller's names for the two feature arguments,
    e.g. info_nce_loss's queries and keys)."""
    a, b = names
    _check_features(a, image_features)
    _check_features(b, text_features)
    if image_features.device != text_features.device:
        raise ValueError(
            f"{a} is on {image_features.device} but {b} is on "
            f"{text_features.device}; both must be on the same device"
        )
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"batch size mismatch: {a} has shape {tuple(image_features.shape)} "
            f"and {b} has shape {tuple(text_features.shape)}; the loss pairs "
            "row i of one with row i of the other"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"embedding dim mismatch: {a} has shape {tuple(image_features.shape)} "
            f"and {b} has shape {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0:
        raise ValueError(
            f"empty batch: {a} has shape {tuple(image_features.shape)}; "
            "the contrastive loss needs at least one pair"
        )
    if image_features.shape[1] == 0:
        raise ValueError(
            f"zero-dimensional embeddings: {a} has shape {tuple(image_features.shape)}"
        )
    device = image_features.device
    param_dtype = torch.promote_types(
        torch.promote_types(image_features.dtype, text_features.dtype), torch.float32
    )
    scale = _as_scalar_tensor("logit_scale", logit_scale, device, param_dtype)
    bias = None
    if logit_bias is not None:
        bias = _as_scalar_tensor("logit_bias", logit_bias, device, param_dtype)
    if not _values_readable(scale):
        return LossInputs(image_features, text_features, scale, bias, values_checked=False,
                          names=names)
    # One host sync per call in eager mode: a non-positive or non-finite scale
    # silently gives a meaningless loss, which is worse than the microseconds
    # the check costs.
    scale_value = float(scale.detach().reshape(()).item())
    if not math.isfinite(scale_value) or scale_value <= 0:
        raise ValueError(
            f"logit_scale must be finite and > 0 (the already-exponentiated temperature, "
            f"open_clip's logit_scale.exp()), got {scale_value}"
        )
    if bias is not None:
        bias_value = float(bias.detach().reshape(()).item())
        if not math.isfinite(bias_value):
            raise ValueError(f"logit_bias must be finite, got {bias_value}")
    return LossInputs(image_features, text_features, scale, bias, names=names)


def _values_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t`` on the host is possible and costs no graph break."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def poison_invalid_scalars(loss: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    """The loss, or NaN (loss and gradients) when the scale is not finite and
    > 0 or the bias is not finite: the device-side stand-in for check_inputs'
    ValueError when the values were not read (no host sync inside a compiled
    graph)."""
    if inputs.values_checked:
        return loss
    scale = inputs.logit_scale.detach().reshape(())
    valid = torch.isfinite(scale) & (scale > 0)
    if inputs.logit_bias is not None:
        valid = valid & torch.isfinite(inputs.logit_bias.detach().reshape(()))
    # A factor, not torch.where: the gradients must turn NaN with the loss.
    return loss * torch.where(valid, 1.0, float("nan")).to(loss.dtype)
