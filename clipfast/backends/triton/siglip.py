"""Fused SigLIP loss in Triton: kernels, then launchers, then the operators.

With logits ``L = s X^ Y^T + b`` and labels z = +1 on (i, i) (``positives``),
-1 elsewhere, the loss is ``sum_ij softplus(-z_ij L_ij) / N`` and its
gradient with respect to the logits ``W_ij / N`` with
``W = -z sigmoid(-z L)``, |W| <= 1 (see ``clipfast.backends._ops``). No softmax
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
as the CLIP gradient panel, so the products read raw feature rows; fp16
panels hold 2^14 W instead) and per-tile partial sums of W * cosine and W
for the scale and bias gradients; the CLIP backend's ``_panel_grads_kernel``
then accumulates dX^ += W Y^ and dY^ += W^T X^, and its finish kernel applies
the normalisation backward and the factor s * grad / N. Panels never hold
N x N; the extra memory is that of the CLIP backward: the two gradients, a
byte plane for half-precision dY^ (0.25 of them), one panel and a panel-rows
x d fp32 buffer for dX^ (about 0.12 of them at the default panel side for
N = 65536, d = 768).

Tiles and registers were chosen from the compiled code (``python -m
clipfast.aot_check``, ``python -m clipfast.perfmodel --loss siglip``): the
epilogue is cheap enough (about 20 instructions a logit) and needs no state
across tiles, so 128 x 128 forward tiles fit in 128 registers on sm_90
without normalisation and two CTAs share an SM, one's epilogue overlapping
the other's MMAs.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._ops import KernelOptions, compute_dtype, define_siglip_ops
from .clip_loss import (
    launch_panel_products,
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
    """(log1p(exp(-|L|)), exp(-|L|)), within 1.5 ulps of log1p of the e
    computed, in 11 instructions and one MUFU operation.

    log1p(e) = e g(e) for e in [0, 1], with g a degree-9 minimax fit of
    log1p(e) / e (relative error 4.7e-9; g(0) = 1 exactly). The forward's
    epilogue is as long as its main loop at d = 768, so this matters: a
    general log of 1 + e (libdevice's, ~25 instructions) would also round
    away e's low bits, and 2 atanh(e / (2 + e)) pays ~10 instructions for
    the range checks of an IEEE-style division. Explicit FMAs: the kernels
    are compiled without contraction so that the logits round alike in
    forward and backward, which this polynomial never feeds.
    """
    e = tl.exp2(tl.abs(logits) * -1.4426950408889634)
    g = tl.fma(e, -0.003244024934247136, 0.01985146291553974)
    g = tl.fma(g, e, -0.05695953965187073)
    g = tl.fma(g, e, 0.10603655874729156)
    g = tl.fma(g, e, -0.15305593609809875)
    g = tl.fma(g, e, 0.1967594027519226)
    g = tl.fma(g, e, -0.24954134225845337)
    g = tl.fma(g, e, 0.3332996368408203)
    g = tl.fma(g, e, -0.4999990165233612)
    g = tl.fma(g, e, 1.0)
    return e * g, e


@triton.jit
def _reciprocal_1_2(v):
    """1 / v for v in [1, 2] to about an ulp: rsqrt squared (one MUFU
    operation; Triton's ``1 / v`` is a division with range checks, ~10
    instructions) and one Newton step."""
    r = tl.math.rsqrt(v)
    r = r * r
    return tl.fma(r, tl.fma(-v, r, 1.0), r)


@triton.jit
def _inverse_norms_of(inv_ptr, offs, mask, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    """The rows' inverse norms, or constant ones without normalisation: the
    compiler then drops the multiplications by them, and a wide tile saves
    the registers of a per-column vector."""
    if NORMALIZE:
        inv = tl.load(inv_ptr + offs, mask=mask, other=0.0)
    else:
        inv = tl.full((BLOCK,), 1.0, tl.float32)
    return inv


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row block, column block) of a tile index in grouped order: the
    programs running at once cover GROUP_M row blocks and a band of column
    blocks, so each operand block they read serves several of them from L2
    (row-major order would stream all of X past every column block)."""
    group_size = GROUP_M * num_n
    first_m = (tile // group_size) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group_size) % group_m, (tile % group_size) // group_m


@triton.jit
def _siglip_forward_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, scale_ptr, bias_ptr, partial_ptr,
    M, K, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr, NORMALIZE: tl.constexpr,
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
        inv_x = _inverse_norms_of(inv_x_ptr, offs_m, mask_m, NORMALIZE, BLOCK_M)
        inv_y = _inverse_norms_of(inv_y_ptr, offs_n, mask_n, NORMALIZE, BLOCK_N)
        acc, tile_inv_x, tile_inv_y = _tile_dots(
            x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, inv_x, inv_y,
            stride_xn, stride_xd, stride_yn, stride_yd,
            GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        _, logits = _logits_from_dots(acc, tile_inv_x, tile_inv_y, scale, bias_ptr, HAS_BIAS)
        # softplus(-zL) = max(-zL, 0) + log1p(exp(-|L|)): |zL| = |L| whatever z.
        soft, _ = _log1p_exp_neg_abs(logits)
        if POSITIVES:
            # A select per element, not a branch on diagonal tiles: a tile-sized
            # value merged from two branches stays live across them, and
            # that was the difference between spilling and not.
            on_diag = (tl.arange(0, BLOCK_M) + (rb * BLOCK_M - cb * BLOCK_N))[:, None] \
                == tl.arange(0, BLOCK_N)[None, :]
            hinge = tl.maximum(tl.where(on_diag, -logits, logits), 0.0)
        else:
            hinge = tl.maximum(logits, 0.0)
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
    HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr, NORMALIZE: tl.constexpr,
    FOLD_INV_NORMS: tl.constexpr, PANEL_SCALE: tl.constexpr,
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
    inv_x = _inverse_norms_of(inv_x_ptr, offs_m, mask_m, NORMALIZE, BLOCK_M)
    inv_y = _inverse_norms_of(inv_y_ptr, offs_n, mask_n, NORMALIZE, BLOCK_N)
    acc, tile_inv_x, tile_inv_y = _tile_dots(
        x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, inv_x, inv_y,
        stride_xn, stride_xd, stride_yn, stride_yd,
        GUARD_HUGE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    cosine, logits = _logits_from_dots(acc, tile_inv_x, tile_inv_y, scale, bias_ptr, HAS_BIAS)
    # sigmoid(L) and sigmoid(-L) from e = exp(-|L|): (1 or e) / (1 + e), never
    # 1 - sigmoid, which would lose the small one to cancellation.
    e = tl.exp2(tl.abs(logits) * -1.4426950408889634)
    r = _reciprocal_1_2(1.0 + e)
    above = logits >= 0.0
    if POSITIVES:
        # -z sigmoid(-zL): sigmoid(L) off the diagonal, -sigmoid(-L) on it; a
        # select per element rather than a branch (see the forward kernel).
        on_diag = (local_m + (row_start - col_start))[:, None] == local_n[None, :]
        grad = tl.where(above != on_diag, 1.0, e) * r
        grad = tl.where(on_diag, -grad, grad)
    else:
        grad = tl.where(above, 1.0, e) * r
    if FOLD_INV_NORMS:
        shift_x, shift_y, _, _ = _fold_shifts(inv_range_ptr)
        folded = grad * (inv_x * shift_x)[:, None] * (inv_y * shift_y)[None, :]
    else:
        # fp16 panels hold 2^14 W: sigmoid(-10) = 4.5e-5, the weight of a
        # negative at open_clip's initial bias, is below fp16's normal range
        # (6.1e-5) and would lose bits; times 2^14 W stays normal down to
        # 3.7e-9 and below 65504.
        folded = grad * PANEL_SCALE
    g_ptrs = (grad_panel_ptr + local_m[:, None].to(tl.int64) * stride_gm
              + local_n[None, :].to(tl.int64) * stride_gn)
    # Only edge tiles pay for the mask. Both branches end in scalars and
    # stores: a tile-sized value merged from two branches would stay live
    # across them (registers).
    if ((pid_m + 1) * BLOCK_M <= panel_rows) & ((pid_n + 1) * BLOCK_N <= panel_cols):
        scale_partial = tl.sum(tl.sum(grad * cosine, axis=1), axis=0)
        bias_partial = tl.sum(tl.sum(grad, axis=1), axis=0)
        tl.store(g_ptrs, folded.to(grad_panel_ptr.dtype.element_ty))
    else:
        valid = mask_m[:, None] & mask_n[None, :]
        scale_partial = tl.sum(tl.sum(tl.where(valid, grad * cosine, 0.0), axis=1), axis=0)
        bias_partial = tl.sum(tl.sum(tl.where(valid, grad, 0.0), axis=1), axis=0)
        tl.store(g_ptrs, folded.to(grad_panel_ptr.dtype.element_ty), mask=valid)

    # One slot per row tile of the block and column tile of a panel, summed
    # over the column panels in launch order (deterministic, no atomics) and
    # once at the end.
    slot = (row_start // BLOCK_M + pid_m).to(tl.int64) * part_pitch + pid_n
    if col_start == 0:
        tl.store(scale_grad_part_ptr + slot, scale_partial)
        tl.store(bias_grad_part_ptr + slot, bias_partial)
    else:
        tl.store(scale_grad_part_ptr + slot, tl.load(scale_grad_part_ptr + slot) + scale_partial)
        tl.store(bias_grad_part_ptr + slot, tl.load(bias_grad_part_ptr + slot) + bias_partial)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #


def _forward_config(dot_dtype: torch.dtype, precision: str, interpret: bool) -> dict:
    if interpret or (dot_dtype == torch.float32 and precision == "ieee"):
        # The interpreter's small tiles keep multi-tile and edge paths
        # exercised at test sizes; exact fp32 runs FMA dots (see _tile_config).
        return dict(_tile_config(dot_dtype, precision, interpret), GROUP_M=2 if interpret else 8)
    # No statistics live across tiles here (the CLIP forward keeps per-element
    # column state): 128 x 128 tiles fit, 1.5x the CLIP tile's FLOPs per byte
    # of operands, and without normalisation sm_90 needs 128 registers: two
    # CTAs per SM, one's epilogue under the other's MMAs.
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32 if dot_dtype == torch.float32 else 64,
                num_warps=8, num_stages=3, GROUP_M=8)


def _grad_config(dot_dtype: torch.dtype, precision: str, interpret: bool,
                 normalize: bool) -> dict:
    if interpret or (dot_dtype == torch.float32 and precision == "ieee"):
        return _tile_config(dot_dtype, precision, interpret)
    # The forward's BLOCK_K, so each logit sums its products in the same order.
    cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32 if dot_dtype == torch.float32 else 64,
               num_warps=8, num_stages=3)
    if not normalize:
        # About 117 registers without a cap (sm_80 and sm_90): at 128, two
        # CTAs share an SM. Normalised rows (inverse norms, the folded panel,
        # the huge-row guard) need more; capped, they spill.
        cfg["maxnreg"] = 128
    return cfg


def panel_scale(x: torch.Tensor, y: torch.Tensor) -> float:
    """The power of two the gradient panel carries (see ``_siglip_grad_kernel``):
    ``siglip_block_grads``' Y accumulator holds this times W^T X^."""
    return 2.0 ** 14 if _dot_dtype(x, y) == torch.float16 else 1.0


def _guard_huge(dot_dtype: torch.dtype, normalize: bool) -> bool:
    # Unnormalised rows keep inverse norm 1: never "huge" (``_huge_row_scales``).
    return normalize and _rows_can_be_huge(dot_dtype)


def siglip_block_sum(x, y, inv_x, inv_y, scale, bias, positives: bool, *, normalize: bool,
                     allow_tf32: bool) -> torch.Tensor:
    """fp64 0-dim sum of softplus(-z L) over the M x K block, z = +1 on (i, i)
    with ``positives``. ``scale`` / ``bias`` are 1-element fp32 tensors (bias
    may be None); without ``normalize`` the inverse norms are not read."""
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
            HAS_BIAS=bias is not None, POSITIVES=positives, NORMALIZE=normalize,
            GUARD_HUGE=_guard_huge(dot_dtype, normalize),
            DOT_DTYPE=_TORCH_TO_TL[dot_dtype], INPUT_PRECISION=precision,
            enable_fp_fusion=_LOGIT_FUSION,
            **cfg,
        )
    return partials.sum(dtype=torch.float64)


def backward_plan(x, y, normalize: bool, allow_tf32: bool, panel: Optional[int]):
    """(panel side, tile config, product config) of ``siglip_block_grads``.

    The panel side is the CLIP backward's (``_panel_size``): extra memory of
    one side x side panel in the dot dtype and a side x d fp32 buffer for dX^.
    """
    interpret = interpreter_active()
    dot_dtype = _dot_dtype(x, y)
    precision = _input_precision(dot_dtype, allow_tf32, interpret)
    cfg = _grad_config(dot_dtype, precision, interpret, normalize)
    fold = folds_inv_norms(x, y, normalize)
    mm_cfg = _matmul_config(dot_dtype, normalize and not fold, precision, interpret)
    sm_count = _num_programs_target(x.device, interpret) // 2 if not interpret else None
    side = _panel_size(max(x.shape[0], y.shape[0]), x.shape[1], panel, cfg, mm_cfg, sm_count)
    return side, cfg, mm_cfg


def siglip_block_grads(x, y, inv_x, inv_y, scale, bias, positives: bool, *, normalize: bool,
                       allow_tf32: bool, panel: Optional[int], x_out=None, x_factor=None,
                       y_acc=None, y_acc_lo=None):
    """Accumulate the gradients of the M x K block's softplus sum.

    X side: ``x_out`` (finished per row panel with ``x_factor``, in x's
    dtype) or nothing; Y side: ``y_acc`` (fp32 K x d, or the int16 high plane
    with ``y_acc_lo``) += ``panel_scale`` x W^T @ X^, carrying the inverse
    norms when ``folds_inv_norms``. Returns fp64 0-dim (sum W * cosine,
    sum W): the scale and bias gradients before their factor.
    """
    _refuse_interpreted_bf16(x, y)
    m, d = x.shape
    k = y.shape[0]
    interpret = interpreter_active()
    dot_dtype = _dot_dtype(x, y)
    precision = _input_precision(dot_dtype, allow_tf32, interpret)
    guard = _guard_huge(dot_dtype, normalize)
    fold = folds_inv_norms(x, y, normalize)
    side, cfg, mm_cfg = backward_plan(x, y, normalize, allow_tf32, panel)
    device = x.device
    need_x = x_out is not None
    need_y = y_acc is not None

    panel_acc = torch.empty(min(side, m), d, dtype=torch.float32, device=device) if need_x else None
    grad_panel = torch.empty(min(side, m), min(side, k), dtype=dot_dtype, device=device)
    part_pitch = triton.cdiv(min(side, k), cfg["BLOCK_N"])
    parts = torch.empty(2, triton.cdiv(m, cfg["BLOCK_M"]), part_pitch, dtype=torch.float32,
                        device=device)
    scale_part, bias_part = parts.unbind(0)  # views made once, not per launch
    unused = parts  # pointer arguments a specialisation never reads
    gx = panel_acc if need_x else unused
    gy = y_acc if need_y else unused
    gy_lo = y_acc_lo if y_acc_lo is not None else gy
    bias_arg = bias if bias is not None else scale
    inv_range = unused
    if need_x and panel_scale(x, y) != 1.0:
        x_factor = x_factor / panel_scale(x, y)  # exact: a power of two
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
                    x, y, inv_x, inv_y, scale, bias_arg, grad_panel, scale_part, bias_part, inv_range,
                    m, k, d, row_start, col_start, rows, cols, part_pitch,
                    x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                    grad_panel.stride(0), grad_panel.stride(1),
                    HAS_BIAS=bias is not None, POSITIVES=positives, NORMALIZE=normalize,
                    FOLD_INV_NORMS=fold, PANEL_SCALE=panel_scale(x, y), GUARD_HUGE=guard,
                    DOT_DTYPE=_TORCH_TO_TL[dot_dtype], INPUT_PRECISION=precision,
                    enable_fp_fusion=_LOGIT_FUSION,
                    **cfg,
                )
            if not (need_x or need_y):
                continue
            launch_panel_products(
                grad_panel, rows, cols, row_start, col_start, 0,
                x, inv_x, y, inv_y, gx, gy, gy_lo, inv_range, need_x, need_y,
                split_acc_y=y_acc_lo is not None, scale_rows=normalize and not fold, unshift=fold,
                dot_dtype=dot_dtype, precision=precision, mm_cfg=mm_cfg)
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
    ``clipfast.backends._ops``)."""
    scale_f32, bias_f32 = _scalars(scale, bias)
    inv_x, inv_y = inverse_norms(x, options.normalize), inverse_norms(y, options.normalize)
    total = siglip_block_sum(x, y, inv_x, inv_y, scale_f32, bias_f32, positives,
                             normalize=options.normalize, allow_tf32=options.allow_tf32)
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
        finish_feature_grad(y_acc, y, inv_y, factor / panel_scale(x, y), options.normalize,
                            folds_inv_norms(x, y, options.normalize), grad_y, acc_lo=y_acc_lo)
    coef64 = grad_loss.detach().double().reshape(()) / x.shape[0]
    grad_scale = (scale_sum * coef64).reshape(scale.shape).to(scale.dtype) if need_scale else None
    grad_bias = (bias_sum * coef64).reshape(bias.shape).to(bias.dtype) if need_bias else None
    return grad_x, grad_y, grad_scale, grad_bias


triton_siglip_ops = define_siglip_ops("triton", triton_siglip_forward, triton_siglip_backward)
