"""The chunked backend: CLIP and SigLIP losses in pure PyTorch, on any device,
with extra memory O(chunk * N).

Forward walks over row chunks of the logit matrix: each chunk gives its rows'
statistics directly and is merged into running column statistics (online
max / sum). Backward recomputes each chunk from the saved statistics, so only
the row/column (max, log-sum) pairs (N floats each) and the inverse norms
survive the forward pass. The block primitives (``block_forward``,
``block_backward``) work on any M x K block, which is what the distributed
modes build on. Arithmetic is done in fp32 (fp64 for fp64 inputs); gradients are
returned in each input's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._base import BLOCKS, HALF_AND_SINGLE, ROWS, SIGLIP, Backend
from ._ops import (KernelOptions, RowCrossEntropyFunction, clip_forward_result, compute_dtype,
                   define_clip_loss_op, define_siglip_ops, kept_buffer, kept_rows_of, row_forward,
                   without_autocast)
from ._stats import merge_logsumexp
from .reference import siglip_labels

# Default number of logits materialised at once (rows_per_chunk * N).
DEFAULT_CHUNK_ELEMENTS = 1 << 22

_NORM_EPS = 1e-12  # as F.normalize



def _block_rows(m: int, k: int, chunk_elements: int) -> int:
    """Rows per chunk of an M x K block: chunk_elements // K, and for a square
    block at most half the rows, so the N x N logits never exist, even for
    small N."""
    rows = min(m, chunk_elements // max(k, 1))
    return max(1, min(-(-m // 2), rows) if m == k else rows)


def _pow2_row_scales(features: torch.Tensor) -> torch.Tensor:
    """Per row, a power of two within a factor 2 of its largest |entry| (1 for
    zero or non-finite rows), shape (rows, 1).

    Dividing by it is exact, so norms of the scaled rows neither overflow
    (fp32 squares pass 3.4e38 from |x| ~ 1.8e19 on) nor underflow, and where
    the plain computation stays in range its result is unchanged bit for bit.
    """
    top = features.abs().amax(dim=1, keepdim=True)
    _, exponent = torch.frexp(top)  # top = m * 2^exponent, 0.5 <= m < 1
    one = torch.ones_like(top)
    return torch.where(torch.isfinite(top) & (top > 0), torch.ldexp(one, exponent - 1), one)


def inverse_norms(features: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(|row|, eps) in ``dtype`` (all ones when normalize is False),
    computed without overflow in the squares (see ``_pow2_row_scales``)."""
    if not normalize:
        return torch.ones(features.shape[0], dtype=dtype, device=features.device)
    features = features.to(dtype)
    scale = _pow2_row_scales(features)
    scaled_norm = torch.linalg.vector_norm(features / scale, dim=1, keepdim=True)
    # 1 / max(|x|, eps) = (1 / max(|x| / scale, eps / scale)) / scale: the
    # reciprocal of a number >= 1 (or of eps / scale), then an exact division,
    # where |x| itself may not be representable (every entry near FLT_MAX).
    return (torch.maximum(scaled_norm, _NORM_EPS / scale).reciprocal() / scale).squeeze(1)


def normalize_backward(
    grad_normalized: torch.Tensor, features: torch.Tensor, inv_norm: torch.Tensor
) -> torch.Tensor:
    """Gradient through x^ = x / max(|x|, eps), given dL/dx^ (all in one float dtype).

    (dx^ - x^ <x^, dx^>) / |x|; when |x| < eps the clamp is active and the
    Jacobian is simply 1/eps, so the projection term must be dropped.
    """
    unit = features * inv_norm[:, None]
    radial = (unit * grad_normalized).sum(dim=1, keepdim=True)
    # A plain norm is safe for this test alone: rows whose squares overflow
    # give inf (not clamped, rightly), and a row of norm >= eps cannot have
    # its squares all underflow. Huge rows need nothing else here: x * inv is
    # their unit row.
    clamped = torch.linalg.vector_norm(features, dim=1, keepdim=True) < _NORM_EPS
    radial = torch.where(clamped, torch.zeros_like(radial), radial)
    return (grad_normalized - unit * radial) * inv_norm[:, None]


def unit_rows(features: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """Normalised rows in the compute dtype of ``inv_norm``."""
    return features.to(inv_norm.dtype) * inv_norm[:, None]


def block_forward(x_unit, y_unit, scale, bias, diag_offset: Optional[int], chunk_elements: int,
                  with_cols: bool = True, kept: Optional[torch.Tensor] = None):
    """Statistics of one block of logits L = s * X^ Y^T (+ b), M x K, in row chunks.

    Returns (row_max, row_sum, col_max, col_sum, diag): per row and per column
    the max and sum(exp(L - max)) over this block (col_* are None without
    ``with_cols``), and ``diag[i] = L[i, i + diag_offset]`` (None when
    ``diag_offset`` is None, i.e. the block holds no labels). ``kept``: an
    (R, K) buffer that receives the cosines of the first R rows (whole
    chunks) for ``block_backward``.
    """
    m, k = x_unit.shape[0], y_unit.shape[0]
    rows = _block_rows(m, k, chunk_elements)
    dtype, device = x_unit.dtype, x_unit.device
    row_max = torch.empty(m, dtype=dtype, device=device)
    row_sum = torch.empty(m, dtype=dtype, device=device)
    col_max = torch.full((k,), float("-inf"), dtype=dtype, device=device) if with_cols else None
    col_sum = torch.zeros(k, dtype=dtype, device=device) if with_cols else None
    diag = torch.empty(m, dtype=dtype, device=device) if diag_offset is not None else None
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        if kept is not None and stop <= kept.shape[0]:
            cos = torch.mm(x_unit[start:stop], y_unit.t(), out=kept[start:stop])
        else:
            cos = x_unit[start:stop] @ y_unit.t()
        logits = scale * cos
        if bias is not None:
            logits = logits + bias
        chunk_row_max = logits.max(dim=1).values
        row_max[start:stop] = chunk_row_max
        row_sum[start:stop] = torch.exp(logits - chunk_row_max[:, None]).sum(dim=1)
        if with_cols:
            chunk_col_max = logits.max(dim=0).values
            col_max, col_sum = merge_logsumexp(
                col_max, col_sum, chunk_col_max, torch.exp(logits - chunk_col_max[None, :]).sum(dim=0))
        if diag is not None:
            diag[start:stop] = logits.diagonal(offset=start + diag_offset)
    return row_max, row_sum, col_max, col_sum, diag


def block_backward(x_unit, y_unit, scale, bias, row_stats, col_stats, diag_offset: Optional[int],
                   row_coef, col_coef, chunk_elements: int, need_x=True, need_y=True,
                   kept: Optional[torch.Tensor] = None):
    """Gradients of one M x K block with G = row_coef (P - I) + col_coef (Q - I).

    P = exp(L - row lse), Q = exp(L - col lse), from complete (max, log-sum)
    statistics; I marks L[i, i + diag_offset] (absent when diag_offset is None).
    A term whose coef is None is left out. Returns (dL/dX^ (M x d) or None,
    dL/dY^ (K x d) or None, dL/ds): dX^ = s G Y^, dY^ = s G^T X^, ds = sum G cos.
    ``kept``: the forward's cosines of the first rows (read, not recomputed).
    """
    m, k = x_unit.shape[0], y_unit.shape[0]
    rows = _block_rows(m, k, chunk_elements)
    grad_x = torch.empty_like(x_unit) if need_x else None
    grad_y = torch.zeros_like(y_unit) if need_y else None
    grad_s = torch.zeros((), dtype=x_unit.dtype, device=x_unit.device)
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        if kept is not None and stop <= kept.shape[0]:
            cos = kept[start:stop]
        else:
            cos = x_unit[start:stop] @ y_unit.t()
        logits = scale * cos
        if bias is not None:
            logits = logits + bias
        grad_logits = None
        for stats, coef, is_row in ((row_stats, row_coef, True), (col_stats, col_coef, False)):
            if coef is None:
                continue
            stat_max, stat_logsum = stats
            if is_row:
                prob = torch.exp((logits - stat_max[start:stop, None]) - stat_logsum[start:stop, None])
            else:
                prob = torch.exp((logits - stat_max[None, :]) - stat_logsum[None, :])
            if diag_offset is not None:
                # (P - 1) on the labels is exact, where P + Q - 2 would round
                # P + Q at ulp(2) first.
                prob.diagonal(offset=start + diag_offset).sub_(1.0)
            prob *= coef
            grad_logits = prob if grad_logits is None else grad_logits.add_(prob)
        grad_s += (grad_logits * cos).sum()
        if need_x:
            grad_x[start:stop] = scale * (grad_logits @ y_unit)
        if need_y:
            grad_y += scale * (grad_logits.t() @ x_unit[start:stop])
    return grad_x, grad_y, grad_s


def scalar_in(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A scale/bias tensor as a detached 0-dim tensor of ``dtype`` (None stays None)."""
    return None if t is None else t.detach().reshape(()).to(dtype)


def _prepare(x, y, scale, bias, normalize):
    dtype = compute_dtype(x, y)
    return (dtype, inverse_norms(x, normalize, dtype), inverse_norms(y, normalize, dtype),
            scalar_in(scale, dtype), scalar_in(bias, dtype))


def kept_rows(m: int, k: int, block: int, memory_budget: float, itemsize: int) -> int:
    """Rows of cosines the forward keeps under ``memory_budget`` (whole chunks)."""
    return kept_rows_of(m, k, _block_rows(m, k, _chunk(block)), memory_budget, itemsize)


def chunked_forward(x, y, scale, bias, options: KernelOptions):
    """(loss, stats, kept) of the whole N x N problem (see ``clipfast.backends._ops``)."""
    _, inv_x, inv_y, s, b = _prepare(x, y, scale, bias, options.normalize)
    kept = kept_buffer(kept_rows, x, y, options)
    return clip_forward_result(inv_x, inv_y, *block_forward(
        unit_rows(x, inv_x), unit_rows(y, inv_y), s, b, 0, _chunk(options.block),
        kept=kept)) + (kept,)


def chunked_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                     need_x: bool, need_y: bool, need_scale: bool, kept=None):
    inv_x, inv_y, row_max, row_logsum, col_max, col_logsum = stats
    dtype = stats.dtype
    s, b = scalar_in(scale, dtype), scalar_in(bias, dtype)
    coef = grad_loss.to(dtype) / (2 * x.shape[0])
    grad_x_unit, grad_y_unit, grad_s = block_backward(
        unit_rows(x, inv_x), unit_rows(y, inv_y), s, b, (row_max, row_logsum),
        (col_max, col_logsum), 0, coef, coef, _chunk(options.block), need_x, need_y, kept)
    grad_x = features_grad(grad_x_unit, x, inv_x, options.normalize) if need_x else None
    grad_y = features_grad(grad_y_unit, y, inv_y, options.normalize) if need_y else None
    grad_scale = grad_s.reshape(scale.shape).to(scale.dtype) if need_scale else None
    return grad_x, grad_y, grad_scale


chunked_clip_loss_op = define_clip_loss_op("chunked", chunked_forward, chunked_backward,
                                           kept_rows=kept_rows)


def features_grad(grad_unit, features, inv_norm, normalize: bool) -> torch.Tensor:
    """dL/dx from dL/dx^, in the features' dtype."""
    if normalize:
        grad_unit = normalize_backward(grad_unit, features.to(inv_norm.dtype), inv_norm)
    return grad_unit.to(features.dtype)


class ChunkedRows:
    """The row primitives of ``RowCrossEntropyFunction`` in chunked PyTorch."""

    name = "chunked"

    def __init__(self, normalize: bool, chunk_elements: int):
        self.normalize = normalize
        self.chunk = chunk_elements

    def prepare(self, queries, keys, scale, bias):
        _, inv_q, inv_k, s, b = _prepare(queries, keys, scale, bias, self.normalize)
        return inv_q, inv_k, s, b

    def stats(self, queries, keys, inv_q, inv_k, s, b, label_offset):
        row_max, row_sum, _, _, diag = block_forward(
            unit_rows(queries, inv_q), unit_rows(keys, inv_k), s, b, label_offset, self.chunk,
            with_cols=False)
        return row_max, row_sum, diag

    def grads(self, queries, keys, inv_q, inv_k, s, b, row_stats, label_offset, coef, needs,
              scale_meta):
        need_q, need_k, need_scale = needs
        grad_q_unit, grad_k_unit, grad_s = block_backward(
            unit_rows(queries, inv_q), unit_rows(keys, inv_k), s, b, row_stats, None,
            label_offset, coef, None, self.chunk, need_q, need_k)
        return (features_grad(grad_q_unit, queries, inv_q, self.normalize) if need_q else None,
                features_grad(grad_k_unit, keys, inv_k, self.normalize) if need_k else None,
                grad_s.reshape(scale_meta[0]).to(scale_meta[1]) if need_scale else None)


class ChunkedRowCrossEntropyFunction(RowCrossEntropyFunction):
    """``RowCrossEntropyFunction`` in chunks of ``chunk_elements`` logits."""

    @staticmethod
    @without_autocast
    def forward(ctx, queries, keys, scale, bias, normalize: bool, label_offset: int,
                chunk_elements: int, extra_logits=None):
        return row_forward(ctx, ChunkedRows(normalize, chunk_elements), queries, keys, scale,
                           bias, label_offset, extra_logits)


def _chunk(block: int) -> int:
    return DEFAULT_CHUNK_ELEMENTS if block == 0 else block


# --------------------------------------------------------------------------- #
# SigLIP: G_ij = -z_ij sigmoid(-z_ij L_ij) / N needs no softmax statistics, so
# forward and backward are each one sweep over row chunks.
# --------------------------------------------------------------------------- #


def _chunk_cos(x_unit, y_unit, start, stop, kept, fill: bool):
    """The chunk's cosines: into / from ``kept`` where it holds the rows
    (``fill``: the forward writes them), else computed."""
    if kept is None or stop > kept.shape[0]:
        return x_unit[start:stop] @ y_unit.t()
    if fill:
        return torch.mm(x_unit[start:stop], y_unit.t(), out=kept[start:stop])
    return kept[start:stop]


def _chunk_logits(x_unit, y_unit, scale, bias, start, stop, positives, kept=None, fill=False):
    cos = _chunk_cos(x_unit, y_unit, start, stop, kept, fill)
    logits = scale * cos
    if bias is not None:
        logits = logits + bias
    labels = siglip_labels(stop - start, y_unit.shape[0], False, logits.dtype, logits.device)
    if positives:
        labels.diagonal(offset=start).fill_(1.0)
    return cos, logits, labels


def siglip_block_sum(x_unit, y_unit, scale, bias, positives: bool, chunk_elements: int,
                     kept: Optional[torch.Tensor] = None):
    """sum_ij -logsigmoid(z_ij L_ij) over one block, in row chunks (the
    cosines of the first rows kept in ``kept``)."""
    total = torch.zeros((), dtype=x_unit.dtype, device=x_unit.device)
    rows = _block_rows(x_unit.shape[0], y_unit.shape[0], chunk_elements)
    for start in range(0, x_unit.shape[0], rows):
        stop = min(x_unit.shape[0], start + rows)
        _, logits, labels = _chunk_logits(x_unit, y_unit, scale, bias, start, stop, positives,
                                          kept, fill=True)
        total = total - F.logsigmoid(labels * logits).sum()
    return total


def siglip_block_backward(x_unit, y_unit, scale, bias, positives: bool, coef, chunk_elements: int,
                          need_x: bool = True, need_y: bool = True,
                          kept: Optional[torch.Tensor] = None):
    """(dX^, dY^, sum G cos, sum G) of ``coef`` x the block's loss sum."""
    rows = _block_rows(x_unit.shape[0], y_unit.shape[0], chunk_elements)
    grad_x = torch.empty_like(x_unit) if need_x else None
    grad_y = torch.zeros_like(y_unit) if need_y else None
    grad_s = torch.zeros((), dtype=x_unit.dtype, device=x_unit.device)
    grad_b = torch.zeros((), dtype=x_unit.dtype, device=x_unit.device)
    for start in range(0, x_unit.shape[0], rows):
        stop = min(x_unit.shape[0], start + rows)
        cos, logits, labels = _chunk_logits(x_unit, y_unit, scale, bias, start, stop, positives,
                                            kept)
        # d/dL of -logsigmoid(z L) = -z sigmoid(-z L); sigmoid is stable both ways.
        grad_logits = -labels * torch.sigmoid(-labels * logits) * coef
        grad_s += (grad_logits * cos).sum()
        grad_b += grad_logits.sum()
        if need_x:
            grad_x[start:stop] = scale * (grad_logits @ y_unit)
        if need_y:
            grad_y += scale * (grad_logits.t() @ x_unit[start:stop])
    return grad_x, grad_y, grad_s, grad_b


def _prepared(x, y, scale, bias, options: KernelOptions):
    _, inv_x, inv_y, s, b = _prepare(x, y, scale, bias, options.normalize)
    return unit_rows(x, inv_x), unit_rows(y, inv_y), inv_x, inv_y, s, b


def chunked_siglip_forward(x, y, scale, bias, options: KernelOptions, positives: bool = True):
    """(loss, stats = [inv_x, inv_y], kept) (see ``clipfast.backends._ops``)."""
    x_unit, y_unit, inv_x, inv_y, s, b = _prepared(x, y, scale, bias, options)
    kept = kept_buffer(kept_rows, x, y, options)
    total = siglip_block_sum(x_unit, y_unit, s, b, positives, _chunk(options.block), kept)
    return total / x.shape[0], torch.stack([inv_x, inv_y]), kept


def chunked_siglip_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                            need_x: bool, need_y: bool, need_scale: bool, need_bias: bool,
                            positives: bool = True, kept=None):
    x_unit, y_unit, inv_x, inv_y, s, b = _prepared(x, y, scale, bias, options)
    coef = grad_loss.to(x_unit.dtype) / x.shape[0]
    grad_x_unit, grad_y_unit, grad_s, grad_b = siglip_block_backward(
        x_unit, y_unit, s, b, positives, coef, _chunk(options.block), need_x, need_y, kept)
    return (features_grad(grad_x_unit, x, inv_x, options.normalize) if need_x else None,
            features_grad(grad_y_unit, y, inv_y, options.normalize) if need_y else None,
            grad_s.reshape(scale.shape).to(scale.dtype) if need_scale else None,
            grad_b.reshape(bias.shape).to(bias.dtype) if need_bias and bias is not None else None)


chunked_siglip_ops = define_siglip_ops("chunked", chunked_siglip_forward, chunked_siglip_backward,
                                       kept_rows=kept_rows)


# --------------------------------------------------------------------------- #
# Block primitives for the distributed ring mode (clipfast.distributed).
# --------------------------------------------------------------------------- #


class ChunkedBlockOps:
    """Block statistics and gradients with the chunked PyTorch primitives."""

    def __init__(self, x, y, normalize: bool, block: int, allow_tf32: bool = True):
        self.dtype = compute_dtype(x, y)
        self.normalize = normalize
        self.chunk = _chunk(block)
        self._own = None  # (features, inv_norm, unit rows) of the rank's own rows

    def _unit(self, features, inv_norm):
        # The rank's own rows meet every block of the ring: normalise them once.
        if self._own is not None and self._own[0] is features and self._own[1] is inv_norm:
            return self._own[2]
        self._own = (features, inv_norm, unit_rows(features, inv_norm))
        return self._own[2]

    def inverse_norms(self, features):
        return inverse_norms(features, self.normalize, self.dtype)

    def scalars(self, scale, bias):
        return scalar_in(scale, self.dtype), scalar_in(bias, self.dtype)

    def stats(self, x, inv_x, y, inv_y, s, b, diag_offset, with_cols=True):
        return block_forward(self._unit(x, inv_x), unit_rows(y, inv_y), s, b, diag_offset,
                             self.chunk, with_cols)

    def new_accumulator(self, rows, d, device):
        return torch.zeros(rows, d, dtype=self.dtype, device=device)

    def grads(self, x, inv_x, y, inv_y, s, b, row_stats, col_stats, diag_offset, x_acc, y_acc):
        """x_acc += s G Y^, y_acc += s G^T X^ with unscaled G; returns sum G cos."""
        one = torch.ones((), dtype=self.dtype, device=x.device)
        gx, gy, gs = block_backward(
            self._unit(x, inv_x), unit_rows(y, inv_y), s, b, row_stats, col_stats, diag_offset,
            one if row_stats is not None else None, one if col_stats is not None else None,
            self.chunk, need_x=x_acc is not None, need_y=y_acc is not None)
        if x_acc is not None:
            x_acc += gx
        if y_acc is not None:
            y_acc += gy
        return gs

    def finish(self, acc, features, inv_norm, s, coef):
        return features_grad(acc * coef, features, inv_norm, self.normalize)


class ChunkedBackend(Backend):
    name = "chunked"
    summary = "PyTorch in row chunks: any device and dtype, O(chunk * N) extra memory"
    dtypes = HALF_AND_SINGLE + (torch.float64,)
    losses = frozenset({SIGLIP, ROWS, BLOCKS})
    block_option = "chunk_elements"
    keeps_logits = True

    def native(self, device, dtypes):
        return True

    def clip_op(self):
        return chunked_clip_loss_op

    def siglip_ops(self):
        return chunked_siglip_ops

    def row_loss(self, normalize, allow_tf32, block, memory_budget=0.0):
        chunk = _chunk(block)
        return lambda q, k, s, b, label_offset, extra: ChunkedRowCrossEntropyFunction.apply(
            q, k, s, b, normalize, label_offset, chunk, extra)

    def block_ops(self):
        return ChunkedBlockOps


BACKEND = ChunkedBackend()
