"""Chunked CLIP loss in pure PyTorch: any device, extra memory O(chunk * N).

Forward walks over row chunks of the logit matrix: each chunk gives its rows'
log-sum-exp directly and is merged into the running column log-sum-exp with
``logaddexp``. Backward recomputes each chunk from the saved statistics, so
only the row/column LSEs (N floats each) and the inverse norms survive the
forward pass. Arithmetic is done in fp32 (fp64 for fp64 inputs); gradients are
returned in each input's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import LossInputs

# Default number of logits materialised at once (rows_per_chunk * N).
DEFAULT_CHUNK_ELEMENTS = 1 << 22

_NORM_EPS = 1e-12  # as F.normalize


def _rows_per_chunk(n: int, chunk_elements: int) -> int:
    # At most half the rows: the N x N logits never exist, even for small N.
    return max(1, min(-(-n // 2), chunk_elements // max(n, 1)))


def inverse_norms(features: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(|row|, eps) in ``dtype`` (all ones when normalize is False)."""
    if not normalize:
        return torch.ones(features.shape[0], dtype=dtype, device=features.device)
    return torch.linalg.vector_norm(features.to(dtype), dim=1).clamp_min(_NORM_EPS).reciprocal()


def normalize_backward(
    grad_normalized: torch.Tensor, features: torch.Tensor, inv_norm: torch.Tensor
) -> torch.Tensor:
    """Gradient through x^ = x / max(|x|, eps), given dL/dx^ (all in one float dtype).

    (dx^ - x^ <x^, dx^>) / |x|; when |x| < eps the clamp is active and the
    Jacobian is simply 1/eps, so the projection term must be dropped.
    """
    unit = features * inv_norm[:, None]
    radial = (unit * grad_normalized).sum(dim=1, keepdim=True)
    clamped = torch.linalg.vector_norm(features, dim=1, keepdim=True) < _NORM_EPS
    radial = torch.where(clamped, torch.zeros_like(radial), radial)
    return (grad_normalized - unit * radial) * inv_norm[:, None]


class ChunkedClipLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, normalize: bool, chunk_elements: int):
        n = x.shape[0]
        dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        inv_x = inverse_norms(x, normalize, dtype)
        inv_y = inverse_norms(y, normalize, dtype)
        s = scale.detach().reshape(()).to(dtype)
        b = bias.detach().reshape(()).to(dtype) if bias is not None else None
        y_unit = y.to(dtype) * inv_y[:, None]

        rows = _rows_per_chunk(n, chunk_elements)
        row_max = torch.empty(n, dtype=dtype, device=x.device)
        row_logsum = torch.empty(n, dtype=dtype, device=x.device)
        col_max = torch.full((n,), float("-inf"), dtype=dtype, device=x.device)
        col_sum = torch.zeros(n, dtype=dtype, device=x.device)
        diag = torch.empty(n, dtype=dtype, device=x.device)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            x_unit = x[start:stop].to(dtype) * inv_x[start:stop, None]
            logits = s * (x_unit @ y_unit.t())
            if b is not None:
                logits = logits + b
            chunk_row_max = logits.max(dim=1).values
            row_max[start:stop] = chunk_row_max
            row_logsum[start:stop] = torch.log(torch.exp(logits - chunk_row_max[:, None]).sum(dim=1))
            new_col_max = torch.maximum(col_max, logits.max(dim=0).values)
            col_sum = col_sum * torch.exp(col_max - new_col_max) + torch.exp(
                logits - new_col_max[None, :]).sum(dim=0)
            col_max = new_col_max
            diag[start:stop] = logits.diagonal(offset=start)
        col_logsum = torch.log(col_sum)
        loss = clip_loss_from_stats(row_max, row_logsum, col_max, col_logsum, diag)

        ctx.save_for_backward(x, y, scale, bias, inv_x, inv_y, row_max, row_logsum, col_max, col_logsum)
        ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
        ctx.normalize = normalize
        ctx.chunk_elements = chunk_elements
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, y, scale, bias, inv_x, inv_y, row_max, row_logsum, col_max, col_logsum = ctx.saved_tensors
        need_x, need_y, need_scale, need_bias = ctx.needs_input_grad[:4]
        n = x.shape[0]
        dtype = row_max.dtype
        s = scale.detach().reshape(()).to(dtype)
        b = bias.detach().reshape(()).to(dtype) if bias is not None else None
        g = grad_loss.to(dtype)
        y_unit = y.to(dtype) * inv_y[:, None]

        rows = _rows_per_chunk(n, chunk_elements=ctx.chunk_elements)
        grad_x_unit = torch.empty(n, x.shape[1], dtype=dtype, device=x.device) if need_x else None
        grad_y_unit = torch.zeros(n, y.shape[1], dtype=dtype, device=y.device) if need_y else None
        grad_s = torch.zeros((), dtype=dtype, device=x.device)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            x_unit = x[start:stop].to(dtype) * inv_x[start:stop, None]
            cos = x_unit @ y_unit.t()
            logits = s * cos
            if b is not None:
                logits = logits + b
            # G = (P + Q - 2 I) / (2N), scaled by the incoming gradient.
            # (P - 1) + (Q - 1) on the diagonal: each difference is exact, where
            # P + Q - 2 would first round P + Q at ulp(2).
            grad_logits = torch.exp((logits - row_max[start:stop, None]) - row_logsum[start:stop, None])
            grad_logits.diagonal(offset=start).sub_(1.0)
            prob_col = torch.exp((logits - col_max[None, :]) - col_logsum[None, :])
            prob_col.diagonal(offset=start).sub_(1.0)
            grad_logits += prob_col
            del prob_col
            grad_logits *= g / (2 * n)
            if need_scale:
                grad_s += (grad_logits * cos).sum()
            if need_x:
                grad_x_unit[start:stop] = s * (grad_logits @ y_unit)
            if need_y:
                grad_y_unit += s * (grad_logits.t() @ x_unit)

        grad_x = grad_y = grad_scale = grad_bias = None
        if need_x:
            grad_x = normalize_backward(grad_x_unit, x.to(dtype), inv_x) if ctx.normalize else grad_x_unit
            grad_x = grad_x.to(x.dtype)
        if need_y:
            grad_y = normalize_backward(grad_y_unit, y.to(dtype), inv_y) if ctx.normalize else grad_y_unit
            grad_y = grad_y.to(y.dtype)
        if need_scale:
            grad_scale = grad_s.reshape(scale.shape).to(scale.dtype)
        if need_bias:
            grad_bias = exact_zero_bias_grad(row_logsum, col_logsum, g, *ctx.bias_meta)
        return grad_x, grad_y, grad_scale, grad_bias, None, None


def clip_loss_from_stats(row_max, row_logsum, col_max, col_logsum, diag_logits):
    """Loss from split log-sum-exps: lse = max + log(sum exp(L - max)).

    Keeping the max and the log-sum apart (instead of one rounded lse) is what
    makes exp((L - max) - logsum) as accurate as PyTorch's softmax: L - max is
    exact when L is near the max, while a rounded lse of magnitude |L| would
    carry an absolute error of ulp(|L|) into every probability.
    """
    n = diag_logits.shape[0]
    row_ce = (row_max - diag_logits) + row_logsum
    col_ce = (col_max - diag_logits) + col_logsum
    return (row_ce.sum() + col_ce.sum()) / (2 * n)


def merge_split_stats(part_max: torch.Tensor, part_sum: torch.Tensor):
    """Merge (max, sum exp(L - max)) partials over dim 0 into (max, log-sum)."""
    total_max = part_max.max(dim=0).values
    total_sum = (part_sum * torch.exp(part_max - total_max[None, :])).sum(dim=0)
    return total_max, torch.log(total_sum)


def exact_zero_bias_grad(row_stat, col_stat, grad_loss, shape, dtype) -> torch.Tensor:
    """d loss / d bias, which is identically zero.

    Softmax cross-entropy is invariant to adding a constant to every logit, so
    sum_ij G_ij = (N + N - 2N) / 2N = 0 exactly. Summing N^2 rounded terms would
    only return rounding noise; the product with the statistics keeps a NaN
    anywhere in the forward visible in this gradient too.
    """
    poison = (row_stat.sum() + col_stat.sum()) * grad_loss
    return (poison * 0).reshape(shape).to(dtype)


def chunked_clip_loss(
    inputs: LossInputs, normalize: bool = True, chunk_elements: Optional[int] = None
) -> torch.Tensor:
    chunk = DEFAULT_CHUNK_ELEMENTS if chunk_elements is None else int(chunk_elements)
    if chunk < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    return ChunkedClipLossFunction.apply(
        inputs.image_features,
        inputs.text_features,
        inputs.logit_scale,
        inputs.logit_bias,
        normalize,
        chunk,
    )
