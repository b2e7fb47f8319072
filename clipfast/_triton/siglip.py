"""Fused SigLIP loss in Triton: kernels, then launchers, then the operators.

With logits ``L = s X^ Y^T + b`` and labels z = +1 on (i, i) (``positives``),
-1 elsewhere, the loss is ``sum_ij softplus(-z_ij L_ij) / N`` and its
gradient with respect to the logits ``W_ij / N`` with
``W = -z sigmoid(-z L)``, |W| <= 1 (see ``clipfast.siglip``). No softmax
statistics exist, so:

Forward (2 N^2 d FLOPs): ``_siglip_forward_kernel`` is a persistent grid of
about two programs per SM; each takes tiles in grouped order (programs
running at once share operand rows in L2), computes the tile's dot products
on-chip with fp32 accumulation through the CLIP kernels' own tile routine
(``_tile_dots``: norms, scale and bias in the epilogue, huge rows scaled),
and adds the tile's softplus sum to its running total (compensated, so the
order of a few thousand tile sums costs no accuracy). One partial per
program, summed once in fp64 on the host side: deterministic, no atomics.

Backward (6 N^2 d FLOPs): per panel of the logits, ``_siglip_grad_kernel``
recomputes the tile through the same code, writes W (times inv_x_i inv_y_j,
as the CLIP gradient panel, so the products read raw feature rows) and
per-tile partial sums of W * cosine and W for the scale and bias gradients;
the CLIP backend's ``_panel_grads_kernel`` then accumulates dX^ += W Y^ and
dY^ += W^T X^, and its finish kernel applies the normalisation backward and
the factor s * grad / N. Panels never hold N x N; the extra memory is that of
the CLIP backward (see ``clipfast/_triton/clip_loss.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._ops import KernelOptions, compute_dtype
from ..siglip import define_siglip_ops
from .clip_loss import (
    _LOGIT_FUSION,
    _TORCH_TO_TL,
    _dot_dtype,
    _fold_shifts,
    _half_precision_accumulator,
    _input_precision,
    _logits_from_dots,
    _matmul_config,
    _num_programs_target,
    _one_launch_at_a_time,
    _panel_grads_kernel,
    _panel_size,
    _refuse_interpreted_bf16,
    _rows_can_be_huge,
    _scalars,
    _tile_config,
    _tile_dots,
    finish_feature_grad,
    folds_inv_norms,
    interpreter_active,
    inverse_norms,
)

# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


@triton.jit
def _log1p_exp_neg_abs(logits):
    """(log1p(exp(-|L|)), exp(-|L|)) to about 2 ulps, without a log1p.

    u = 1 + e rounds away e's low bits; log(u) + (e - (u - 1)) / u puts them
    back (the correction is below ulp(1), so 1 / u ~ 1 - e/2 is accurate
    enough and needs no division). Where u rounds to 1 this is e - e^2/2.
    """
    e = tl.exp(-tl.abs(logits))
    u = 1.0 + e
    return tl.log(u) + (e - (u - 1.0)) * (1.0 - 0.5 * e), e


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row block, column block) of a tile index in grouped order: GROUP_M
    row blocks sweep the columns together, so programs running at once
    share the same column block of Y in L2."""
    group_size = GROUP_M * num_n
    first_m = (tile // group_size) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group_size) % group_m, (tile % group_size) // group_m


@triton.jit
def _siglip_forward_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr, partial_ptr,
    M, K, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr,
    GUARD_HUGE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """partial[program] = sum of softplus(-z L) over the program's tiles of
    the M x K logits (z = +1 on (i, i) with POSITIVES, else -1)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(K, BLOCK_N)
    scale = tl.load(scale_ptr).to(tl.float32)
    total = 0.0
    lost = 0.0  # Kahan compensation: a program adds thousands of tile sums
    for tile in range(pid, num_m * num_n, programs):
        rb, cb = _tile_coords(tile, num_m, num_n, GROUP_M)
        offs_m = (rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (cb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m = offs_m < M
        mask_n = offs_n < K
        inv_x = tl.load(inv_x_ptr + offs_m, mask=mask_m, other=0.0)
        inv_y = tl.load(inv_y_ptr + offs_n, mask=mask_n, other=0.0)
        acc, tile_inv_x, tile_inv_y = _tile_dots(
            x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, inv_x, inv_y,
            stride_xn, stride_xd, stride_yn, stride_yd,
            GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        _, logits = _logits_from_dots(acc, tile_inv_x, tile_inv_y, scale, bias_ptr, HAS_BIAS)
        # softplus(-zL) = max(-zL, 0) + log1p(exp(-|L|)): |zL| = |L| whatever z.
        soft, _ = _log1p_exp_neg_abs(logits)
        hinge = tl.maximum(logits, 0.0)
        if POSITIVES:
            if (rb * BLOCK_M < (cb + 1) * BLOCK_N) & (cb * BLOCK_N < (rb + 1) * BLOCK_M):
                on_diag = offs_m[:, None] == offs_n[None, :]
                hinge = tl.where(on_diag, tl.maximum(-logits, 0.0), hinge)
        # maximum() drops a NaN on GPUs; the log1p term keeps it.
        term = hinge + soft
        if ((rb + 1) * BLOCK_M > M) | ((cb + 1) * BLOCK_N > K):
            # Only edge tiles pay for the mask.
            term = tl.where(mask_m[:, None] & mask_n[None, :], term, 0.0)
        tile_sum = tl.sum(tl.sum(term, axis=1), axis=0)
        step = tile_sum - lost
        new_total = total + step
        lost = (new_total - total) - step
        total = new_total
    tl.store(partial_ptr + pid, total - lost)


@triton.jit
def _siglip_grad_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr, grad_panel_ptr,
    scale_grad_part_ptr, bias_grad_part_ptr, inv_range_ptr,
    M, K, D, row_start, col_start, panel_rows, panel_cols, part_pitch,
    stride_xn, stride_xd, stride_yn, stride_yd,
    stride_gm, stride_gn,
    HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr, FOLD_INV_NORMS: tl.constexpr,
    GUARD_HUGE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of the gradient panel: W = -z sigmoid(-z L) (|W| <= 1, safe in
    fp16/bf16), times inv_x_i inv_y_j (and the powers of two of
    ``_fold_shifts``) with FOLD_INV_NORMS, plus the tile's sums of W * cosine
    and of W."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (row_start + local_m).to(tl.int64)
    offs_n = (col_start + local_n).to(tl.int64)
    mask_m = (local_m < panel_rows) & (offs_m < M)
    mask_n = (local_n < panel_cols) & (offs_n < K)

    scale = tl.load(scale_ptr).to(tl.float32)
    inv_x = tl.load(inv_x_ptr + offs_m, mask=mask_m, other=0.0)
    inv_y = tl.load(inv_y_ptr + offs_n, mask=mask_n, other=0.0)
    acc, tile_inv_x, tile_inv_y = _tile_dots(
        x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, inv_x, inv_y,
        stride_xn, stride_xd, stride_yn, stride_yd,
        GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    cosine, logits = _logits_from_dots(acc, tile_inv_x, tile_inv_y, scale, bias_ptr, HAS_BIAS)
    # sigmoid(L) and sigmoid(-L) from e = exp(-|L|): (1 or e) / (1 + e), never
    # 1 - sigmoid, which would lose the small one to cancellation.
    e = tl.exp(-tl.abs(logits))
    r = 1.0 / (1.0 + e)
    above = logits >= 0.0
    grad = tl.where(above, 1.0, e) * r  # negatives: -z sigmoid(-zL) = sigmoid(L)
    if POSITIVES:
        first_m = row_start + pid_m * BLOCK_M
        first_n = col_start + pid_n * BLOCK_N
        if (first_m < first_n + BLOCK_N) & (first_n < first_m + BLOCK_M):
            on_diag = offs_m[:, None] == offs_n[None, :]
            grad = tl.where(on_diag, -(tl.where(above, e, 1.0) * r), grad)
    valid = mask_m[:, None] & mask_n[None, :]
    grad = tl.where(valid, grad, 0.0)

    # One slot per row tile of the block and column tile of a panel, summed
    # over the column panels in launch order (deterministic, no atomics) and
    # once at the end.
    slot = (row_start // BLOCK_M + pid_m).to(tl.int64) * part_pitch + pid_n
    scale_partial = tl.sum(tl.sum(grad * cosine, axis=1), axis=0)
    bias_partial = tl.sum(tl.sum(grad, axis=1), axis=0)
    if col_start == 0:
        tl.store(scale_grad_part_ptr + slot, scale_partial)
        tl.store(bias_grad_part_ptr + slot, bias_partial)
    else:
        tl.store(scale_grad_part_ptr + slot, tl.load(scale_grad_part_ptr + slot) + scale_partial)
        tl.store(bias_grad_part_ptr + slot, tl.load(bias_grad_part_ptr + slot) + bias_partial)
    if FOLD_INV_NORMS:
        shift_x, shift_y, _, _ = _fold_shifts(inv_range_ptr)
        grad = grad * (inv_x * shift_x)[:, None] * (inv_y * shift_y)[None, :]
    g_ptrs = (grad_panel_ptr + local_m[:, None].to(tl.int64) * stride_gm
              + local_n[None, :].to(tl.int64) * stride_gn)
    tl.store(g_ptrs, grad.to(grad_panel_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #


def _forward_config(dot_dtype: torch.dtype, precision: str, interpret: bool) -> dict:
    return dict(_tile_config(dot_dtype, precision, interpret), GROUP_M=2 if interpret else 8)


def _grad_config(dot_dtype: torch.dtype, precision: str, interpret: bool) -> dict:
    return _tile_config(dot_dtype, precision, interpret)


def siglip_block_sum(x, y, inv_x, inv_y, scale, bias, positives: bool,
                     allow_tf32: bool) -> torch.Tensor:
    """fp64 0-dim sum of softplus(-z L) over the M x K block, z = +1 on (i, i)
    with ``positives``. ``scale`` / ``bias`` are 1-element fp32 tensors (bias
    may be None)."""
    _refuse_interpreted_bf16(x, y)
    m, d = x.shape
    k = y.shape[0]
    interpret = interpreter_active()
    dot_dtype = _dot_dtype(x, y)
    precision = _input_precision(dot_dtype, allow_tf32, interpret)
    cfg = _forward_config(dot_dtype, precision, interpret)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_N"])
    programs = max(1, min(tiles, _num_programs_target(x.device, interpret)))
    partials = torch.empty(programs, dtype=torch.float32, device=x.device)
    with _one_launch_at_a_time():
        _siglip_forward_kernel[(programs,)](
            x, y, inv_x, inv_y, scale, bias if bias is not None else scale, partials,
            m, k, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, POSITIVES=positives,
            GUARD_HUGE=_rows_can_be_huge(dot_dtype),
            DOT_DTYPE=_TORCH_TO_TL[dot_dtype], INPUT_PRECISION=precision,
            enable_fp_fusion=_LOGIT_FUSION,
            **cfg,
        )
    return partials.sum(dtype=torch.float64)


def siglip_block_grads(x, y, inv_x, inv_y, scale, bias, positives: bool, *, normalize: bool,
                       allow_tf32: bool, panel: Optional[int], x_out=None, x_factor=None,
                       y_acc=None, y_acc_lo=None):
    """Accumulate the gradients of the M x K block's softplus sum.

    X side: ``x_out`` (finished per row panel with ``x_factor``, in x's
    dtype) or nothing; Y side: ``y_acc`` (fp32 K x d, or the int16 high plane
    with ``y_acc_lo``) += W^T @ X^, carrying the inverse norms when
    ``folds_inv_norms``. Returns fp64 0-dim (sum W * cosine, sum W): the scale
    and bias gradients before their factor.
    """
    _refuse_interpreted_bf16(x, y)
    m, d = x.shape
    k = y.shape[0]
    interpret = interpreter_active()
    dot_dtype = _dot_dtype(x, y)
    precision = _input_precision(dot_dtype, allow_tf32, interpret)
    cfg = _grad_config(dot_dtype, precision, interpret)
    fold = folds_inv_norms(x, y, normalize)
    mm_cfg = _matmul_config(dot_dtype, normalize and not fold, precision, interpret)
    sm_count = _num_programs_target(x.device, interpret) // 2 if not interpret else None
    side = _panel_size(max(m, k), d, panel, cfg, mm_cfg, sm_count)
    device = x.device
    need_x = x_out is not None
    need_y = y_acc is not None

    panel_acc = torch.empty(min(side, m), d, dtype=torch.float32, device=device) if need_x else None
    grad_panel = torch.empty(min(side, m), min(side, k), dtype=dot_dtype, device=device)
    part_pitch = triton.cdiv(min(side, k), cfg["BLOCK_N"])
    parts = torch.empty(2, triton.cdiv(m, cfg["BLOCK_M"]), part_pitch, dtype=torch.float32,
                        device=device)
    unused = parts  # pointer arguments a specialisation never reads
    gx = panel_acc if need_x else unused
    gy = y_acc if need_y else unused
    gy_lo = y_acc_lo if y_acc_lo is not None else gy
    tiles_d = triton.cdiv(d, mm_cfg["BLOCK_D"])
    bias_arg = bias if bias is not None else scale
    inv_range = unused
    if fold:
        # (max inv_x, max inv_y, min inv_x, min inv_y) for _fold_shifts.
        (x_lo, x_hi), (y_lo, y_hi) = torch.aminmax(inv_x), torch.aminmax(inv_y)
        inv_range = torch.stack((x_hi, y_hi, x_lo, y_lo))

    # Two launches and no tensor operations per panel: offsets travel as
    # kernel arguments, so the host keeps ahead of the GPU.
    for row_start in range(0, m, side):
        rows = min(side, m - row_start)
        if need_x:
            panel_acc.zero_()
        for col_start in range(0, k, side):
            cols = min(side, k - col_start)
            with _one_launch_at_a_time():
                _siglip_grad_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(cols, cfg["BLOCK_N"]))](
                    x, y, inv_x, inv_y, scale, bias_arg, grad_panel, parts[0], parts[1], inv_range,
                    m, k, d, row_start, col_start, rows, cols, part_pitch,
                    x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                    grad_panel.stride(0), grad_panel.stride(1),
                    HAS_BIAS=bias is not None, POSITIVES=positives, FOLD_INV_NORMS=fold,
                    GUARD_HUGE=_rows_can_be_huge(dot_dtype),
                    DOT_DTYPE=_TORCH_TO_TL[dot_dtype], INPUT_PRECISION=precision,
                    enable_fp_fusion=_LOGIT_FUSION,
                    **cfg,
                )
            if not (need_x or need_y):
                continue
            x_tiles = triton.cdiv(rows, mm_cfg["BLOCK_M"]) * tiles_d if need_x else 0
            y_tiles = triton.cdiv(cols, mm_cfg["BLOCK_M"]) * tiles_d if need_y else 0
            with _one_launch_at_a_time():
                _panel_grads_kernel[(x_tiles + y_tiles,)](
                    grad_panel, grad_panel.stride(0), grad_panel.stride(1), rows, cols, d,
                    row_start, col_start, 0,
                    x, x.stride(0), x.stride(1), inv_x,
                    y, y.stride(0), y.stride(1), inv_y,
                    gx, gx.stride(0), gx.stride(1),
                    gy, gy_lo, gy.stride(0), gy.stride(1),
                    inv_range, x_tiles, WITH_X=need_x, WITH_Y=need_y,
                    SCALE_ROWS=normalize and not fold, SPLIT_ACC_Y=y_acc_lo is not None,
                    UNSHIFT=fold,
                    DOT_DTYPE=_TORCH_TO_TL[dot_dtype], INPUT_PRECISION=precision,
                    **mm_cfg,
                )
        if need_x:
            finish_feature_grad(
                panel_acc, x[row_start:row_start + rows], inv_x[row_start:row_start + rows],
                x_factor, normalize, fold, x_out[row_start:row_start + rows])
    sums = parts.sum(dim=(1, 2), dtype=torch.float64)
    return sums[0], sums[1]


# --------------------------------------------------------------------------- #
# Operators
# --------------------------------------------------------------------------- #


def triton_siglip_forward(x, y, scale, bias, options: KernelOptions, positives: bool = True):
    """(loss, stats = [inv_x, inv_y]) through the fused kernels (see
    ``clipfast._ops``)."""
    scale_f32, bias_f32 = _scalars(scale, bias)
    inv_x, inv_y = inverse_norms(x, options.normalize), inverse_norms(y, options.normalize)
    total = siglip_block_sum(x, y, inv_x, inv_y, scale_f32, bias_f32, positives,
                             options.allow_tf32)
    dtype = compute_dtype(x, y)
    return (total / x.shape[0]).to(dtype), torch.stack([inv_x, inv_y]).to(dtype)


def triton_siglip_backward(grad_loss, x, y, scale, bias, stats, options: KernelOptions,
                           need_x: bool, need_y: bool, need_scale: bool, need_bias: bool,
                           positives: bool = True):
    inv_x, inv_y = stats[0].float().contiguous(), stats[1].float().contiguous()
    scale_f32, bias_f32 = _scalars(scale, bias)
    need_bias = need_bias and bias is not None
    # The loss is the block's sum / N: every gradient carries grad_loss / N.
    coef = grad_loss.detach().float().reshape(1) / x.shape[0]
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    grad_y = y_acc = y_acc_lo = None
    if need_y:
        grad_y, y_acc, y_acc_lo = _half_precision_accumulator(y)
    factor = (scale_f32 * coef).contiguous()
    scale_sum, bias_sum = siglip_block_grads(
        x, y, inv_x, inv_y, scale_f32, bias_f32, positives, normalize=options.normalize,
        allow_tf32=options.allow_tf32, panel=options.block or None,
        x_out=grad_x, x_factor=factor, y_acc=y_acc, y_acc_lo=y_acc_lo)
    if need_y:
        finish_feature_grad(y_acc, y, inv_y, factor, options.normalize,
                            folds_inv_norms(x, y, options.normalize), grad_y, acc_lo=y_acc_lo)
    coef64 = grad_loss.detach().double().reshape(()) / x.shape[0]
    grad_scale = (scale_sum * coef64).reshape(scale.shape).to(scale.dtype) if need_scale else None
    grad_bias = (bias_sum * coef64).reshape(bias.shape).to(bias.dtype) if need_bias else None
    return grad_x, grad_y, grad_scale, grad_bias


triton_siglip_ops = define_siglip_ops("triton", triton_siglip_forward, triton_siglip_backward)
