"""The fused backends as ``torch.library`` custom operators.

Each fused backend (chunked, triton, cpu, cuda) provides two plain functions,

    forward(x, y, scale, bias, options)  -> (loss, stats)
    backward(grad_loss, x, y, scale, bias, stats, options, need_x, need_y, need_scale)
                                          -> (grad_x, grad_y, grad_scale), None where not needed

and ``define_clip_loss_op`` turns them into the operators
``clipfast::<backend>_clip_loss`` and ``clipfast::<backend>_clip_loss_backward``
with fake (meta) implementations and an autograd formula. That is what lets
``torch.compile(fullgraph=True)`` and ``torch.export`` trace a training step
through a kernel launcher they cannot look into, and what makes the backends
behave alike under autocast and double backward:

* ``stats`` is one (6, N) tensor in the compute dtype (fp32, or fp64 for fp64
  features): inverse norms of X and Y, row max and log-sum, column max and
  log-sum. It is all the backward needs besides the inputs.
* Autocast: the implementations run with autocast off, so forward and
  backward compute in the features' own dtypes (fp32 accumulation) whatever
  region they are called from. Under ``torch.autocast`` that is at least as
  accurate as PyTorch's own loss, which runs the similarity in the autocast
  dtype.
* Double backward (``create_graph=True``): the kernels compute first-order
  gradients only. When a graph of the gradient is asked for, the backward
  recomputes it from the plain-PyTorch formula (``reference_clip_loss`` in the
  compute dtype), which is exact and twice differentiable but holds the N x N
  logits: double backward costs the reference's memory on every backend.
"""

# No ``from __future__ import annotations``: torch.library.custom_op reads the
# schema from the annotations, and older torch (2.6) wants real types there.
import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference
from ._stats import clip_loss_from_stats, extra_logits_grad, merge_extra_logits, with_bias

STATS_ROWS = 6  # inv_x, inv_y, row_max, row_logsum, col_max, col_logsum
SIGLIP_STATS_ROWS = 2  # inv_x, inv_y: SigLIP's backward needs no softmax statistics

# What to do instead, for the distributed modes' double-backward error.
DISTRIBUTED_DOUBLE_BACKWARD = (
    "compute the loss on gathered features in one process (clipfast.clip_loss supports "
    "create_graph=True on every backend)")


@dataclass(frozen=True)
class KernelOptions:
    """The per-call options an operator carries (its non-tensor arguments).

    ``block`` is the backend's size knob: chunk_elements for chunked, the
    backward panel side for triton, rows per panel for hybrid, 0 for the
    default (ignored by cpu/cuda). ``memory_budget``: the bytes the forward may
    keep for the backward beyond its statistics (0: none; inf: everything),
    honoured by the backends whose operators keep logits (``kept_rows``).
    """

    normalize: bool
    allow_tf32: bool
    block: int
    memory_budget: float = 0.0


def compute_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when either features tensor is fp64: the dtype of the
    loss and of the statistics."""
    return torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)


@contextlib.contextmanager
def autocast_off(device: torch.device):
    """Run the enclosed code as if no autocast region were active (custom
    operators inherit the caller's autocast state, and a backend's PyTorch
    matmuls would otherwise run in the autocast dtype in the forward only)."""
    if device.type in ("cpu", "cuda"):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def refuse_double_backward(what: str, alternative: str) -> None:
    """Raise inside a backward asked for a graph (create_graph=True) that it
    cannot give: first-order gradients without a graph would silently make
    every second-order term zero."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} does not support double backward (backward with create_graph=True); "
            f"{alternative}")


def without_autocast(fn):
    """Decorator for an autograd.Function's forward/backward: run it with
    autocast off on the device of its first tensor argument (see autocast_off)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None:
            return fn(*args, **kwargs)
        with autocast_off(device):
            return fn(*args, **kwargs)

    return wrapper


def _differentiable_grads(reference, grad_loss, x, y, scale, bias, normalize, needs):
    """First-order gradients with a graph, from the plain-PyTorch formula."""
    dtype = compute_dtype(x, y)
    loss = reference(
        x.to(dtype), y.to(dtype), scale.to(dtype), None if bias is None else bias.to(dtype),
        normalize)
    wanted = [t for t, need in zip((x, y, scale, bias), needs) if need]
    grads = iter(torch.autograd.grad(loss, wanted, grad_loss.to(dtype), create_graph=True,
                                     allow_unused=True))
    out = []
    for t, need in zip((x, y, scale, bias), needs):
        g = next(grads) if need else None
        if need and g is None:
            g = torch.zeros_like(t)
        out.append(g)
    return tuple(out)


def exact_zero_bias_grad(row_stat, col_stat, grad_loss, shape, dtype) -> torch.Tensor:
    """d loss / d bias, which is identically zero.

    Softmax cross-entropy is invariant to adding a constant to every logit, so
    sum_ij G_ij = (N + N - 2N) / 2N = 0 exactly. Summing N^2 rounded terms would
    only return rounding noise; the product with the statistics keeps a NaN
    anywhere in the forward visible in this gradient too.
    """
    poison = (row_stat.sum() + col_stat.sum()) * grad_loss
    return (poison * 0).reshape(shape).to(dtype)


@dataclass(frozen=True)
class LossSpec:
    """What the operator factory needs to know about a loss."""

    name: str  # the operator is clipfast::<backend>_<name>_loss
    stats_rows: int  # rows of the (rows, N) statistics the forward saves
    # The plain-PyTorch loss(x, y, scale, bias, normalize), for create_graph=True.
    reference: Callable
    # True: the backend's backward returns the bias gradient too (it takes
    # need_bias and returns 4 gradients). False: the bias gradient is the
    # exact zero of a softmax loss (exact_zero_bias_grad on stats rows 3, 5).
    kernel_bias_grad: bool


def _clip_reference(x, y, scale, bias, normalize):
    # Looked up per call, so that tests can watch it being called.
    return reference.reference_clip_loss(x, y, scale, bias, normalize)


CLIP = LossSpec("clip", STATS_ROWS, _clip_reference, kernel_bias_grad=False)
# SigLIP with positives on the diagonal, and the all-negative blocks of its
# distributed form (other ranks' texts).
SIGLIP = LossSpec("siglip", SIGLIP_STATS_ROWS, reference.reference_siglip_loss, kernel_bias_grad=True)
SIGLIP_NEGATIVES = LossSpec(
    "siglip_negatives", SIGLIP_STATS_ROWS,
    functools.partial(reference.reference_siglip_loss, positives=False), kernel_bias_grad=True)

_OPS: Dict[Tuple[str, str], Callable] = {}


def define_clip_loss_op(backend: str, forward: Callable, backward: Callable,
                        kept_rows: Optional[Callable] = None) -> Callable:
    """Register ``clipfast::<backend>_clip_loss`` (+ ``_backward``) and return
    ``op(x, y, scale, bias, normalize, allow_tf32, block, memory_budget) -> loss``."""
    return define_loss_op(CLIP, backend, forward, backward, kept_rows)


def define_siglip_ops(backend: str, forward: Callable, backward: Callable,
                      kept_rows: Optional[Callable] = None) -> Dict[bool, Callable]:
    """Register a backend's SigLIP operators from ``forward(..., positives)``
    and ``backward(..., positives)``; returns {positives: op}."""
    return {
        positives: define_loss_op(spec, backend, functools.partial(forward, positives=positives),
                                  functools.partial(backward, positives=positives), kept_rows)
        for positives, spec in ((True, SIGLIP), (False, SIGLIP_NEGATIVES))
    }


def kept_rows_of(m: int, k: int, rows: int, memory_budget: float, itemsize: int) -> int:
    """Rows of an M x K block whose logits (``itemsize`` bytes each) fit in
    ``memory_budget`` bytes, in whole panels of ``rows`` from the top (all M
    for inf): what a backend that honours the budget keeps."""
    if memory_budget <= 0:
        return 0
    if math.isinf(memory_budget):
        return m
    fit = int(memory_budget // (itemsize * max(k, 1)))
    if fit >= m:
        return m
    return (fit // rows) * rows


def _kept_shape(kept_rows: Optional[Callable], x, y, block: int, memory_budget: float):
    if kept_rows is None:
        return (0,)
    itemsize = torch.empty((), dtype=compute_dtype(x, y)).element_size()
    return (kept_rows(x.shape[0], y.shape[0], block, memory_budget, itemsize), y.shape[0])


def kept_buffer(kept_rows: Callable, x, y, options: KernelOptions) -> torch.Tensor:
    """The (R, K) compute-dtype buffer a forward keeps under ``options.memory_budget``:
    the shape the operator's fake implementation gives it (``_kept_shape``)."""
    return x.new_empty(_kept_shape(kept_rows, x, y, options.block, options.memory_budget),
                       dtype=compute_dtype(x, y))


def define_loss_op(spec: LossSpec, backend: str, forward: Callable, backward: Callable,
                   kept_rows: Optional[Callable] = None) -> Callable:
    """Register ``clipfast::<backend>_<spec.name>_loss`` (+ ``_backward``) and
    return ``op(x, y, scale, bias, normalize, allow_tf32, block, memory_budget)
    -> loss``.

    ``kept_rows(M, K, block, memory_budget, itemsize) -> R``: the backend keeps logits
    for the backward under a memory budget: its forward returns (loss, stats,
    kept) with kept an (R, K) tensor of the compute dtype, and its backward
    takes ``kept=``. Without it the operator accepts the budget and ignores it.
    """
    key = (spec.name, backend)
    if key in _OPS:
        return _OPS[key]
    name = f"clipfast::{backend}_{spec.name}_loss"

    @torch.library.custom_op(name, mutates_args=())
    def forward_op(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                   bias: Optional[torch.Tensor], normalize: bool, allow_tf32: bool,
                   block: int, memory_budget: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        options = KernelOptions(normalize, allow_tf32, block, memory_budget)
        with autocast_off(x.device):
            out = forward(x, y, scale, bias, options)
        if kept_rows is None:
            return out + (x.new_empty((0,), dtype=compute_dtype(x, y)),)
        return out

    @forward_op.register_fake
    def _(x, y, scale, bias, normalize, allow_tf32, block, memory_budget):
        dtype = compute_dtype(x, y)
        return (x.new_empty((), dtype=dtype),
                x.new_empty((spec.stats_rows, x.shape[0]), dtype=dtype),
                x.new_empty(_kept_shape(kept_rows, x, y, block, memory_budget), dtype=dtype))

    @torch.library.custom_op(name + "_backward", mutates_args=())
    def backward_op(grad_loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    scale: torch.Tensor, bias: Optional[torch.Tensor], stats: torch.Tensor,
                    kept: torch.Tensor, normalize: bool, allow_tf32: bool, block: int,
                    memory_budget: float, need_x: bool, need_y: bool,
                    need_scale: bool, need_bias: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        options = KernelOptions(normalize, allow_tf32, block, memory_budget)
        extra = {} if kept_rows is None else {"kept": kept}
        with autocast_off(x.device):
            if spec.kernel_bias_grad:
                grads = backward(grad_loss, x, y, scale, bias, stats, options, need_x, need_y,
                                 need_scale, need_bias, **extra)
            else:
                grads = backward(grad_loss, x, y, scale, bias, stats, options, need_x, need_y,
                                 need_scale, **extra) + (None,)
        # A custom operator returns tensors only: an empty one stands for None.
        return tuple(g if g is not None else like.new_empty((0,))
                     for g, like in zip(grads, (x, y, scale, scale if bias is None else bias)))

    @backward_op.register_fake
    def _(grad_loss, x, y, scale, bias, stats, kept, normalize, allow_tf32, block, memory_budget,
          need_x, need_y, need_scale, need_bias):
        need_bias = need_bias and spec.kernel_bias_grad and bias is not None
        return tuple(torch.empty_like(like) if need else like.new_empty((0,))
                     for like, need in ((x, need_x), (y, need_y), (scale, need_scale),
                                        (scale if bias is None else bias, need_bias)))

    def setup_context(ctx, inputs, output):
        x, y, scale, bias, normalize, allow_tf32, block, memory_budget = inputs
        loss, stats, kept = output
        ctx.mark_non_differentiable(stats, kept)
        ctx.save_for_backward(x, y, scale, bias, stats, kept)
        ctx.options = (normalize, allow_tf32, block, memory_budget)

    def backward_formula(ctx, grad_loss, _grad_stats, _grad_kept):
        x, y, scale, bias, stats, kept = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        normalize = ctx.options[0]
        none = (None,) * 4  # the options
        if torch.is_grad_enabled() and any(needs):
            # create_graph=True: the kernels' gradients have no graph.
            return _differentiable_grads(spec.reference, grad_loss, x, y, scale, bias,
                                         normalize, needs) + none
        kernel_needs = needs if spec.kernel_bias_grad else needs[:3] + (False,)
        grads = [None] * 4
        if any(kernel_needs):
            grads = list(backward_op(grad_loss, x, y, scale, bias, stats, kept, *ctx.options,
                                     *kernel_needs))
        if needs[3] and not spec.kernel_bias_grad:
            grads[3] = exact_zero_bias_grad(stats[3], stats[5], grad_loss.to(stats.dtype),
                                            bias.shape, bias.dtype)
        return tuple(g if need else None for g, need in zip(grads, needs)) + none

    forward_op.register_autograd(backward_formula, setup_context=setup_context)

    def op(x, y, scale, bias=None, normalize=True, allow_tf32=True, block=0, memory_budget=0.0):
        loss, _, _ = forward_op(x, y, scale, bias, bool(normalize), bool(allow_tf32), int(block),
                                float(memory_budget))
        return loss

    op.forward_op = forward_op
    op.backward_op = backward_op
    _OPS[key] = op
    return op


def pack_stats(inv_x, inv_y, row_max, row_logsum, col_max, col_logsum) -> torch.Tensor:
    return torch.stack([t.to(row_max.dtype) for t in
                        (inv_x, inv_y, row_max, row_logsum, col_max, col_logsum)])


class RowCrossEntropyFunction(torch.autograd.Function):
    """mean_i CE(s Q^_i K^^T + b, label i + label_offset): one direction of the
    CLIP loss over a rectangular M x K block (open_clip's ``local_loss``,
    hard negatives, asymmetric InfoNCE), on a backend's row primitives.

    ``extra_logits`` (M x k, optional, without the bias) are further columns
    of each row alone (a query's own hard negatives): they join the row's
    softmax (never as labels) and get its probabilities as gradient. The bias
    is added to them inside, so the bias gradient stays the exact zero.

    A backend subclasses it with a ``forward`` that takes its own options and
    calls ``row_forward`` with its primitives: an object with ``name`` and

        prepare(queries, keys, scale, bias) -> (inv_q, inv_k, s, b)
        stats(queries, keys, inv_q, inv_k, s, b, label_offset) -> (row_max, row_sum, diag)
        grads(queries, keys, inv_q, inv_k, s, b, (row_max, row_logsum), label_offset,
              coef, (need_q, need_k, need_scale), (scale shape, scale dtype))
            -> (grad_q, grad_k, grad_scale) of coef x the block's summed loss
    """

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss):
        rows = ctx.rows
        refuse_double_backward(f"clipfast's local_loss mode ({rows.name})",
                               DISTRIBUTED_DOUBLE_BACKWARD)
        queries, keys, s, b, inv_q, inv_k, row_max, row_logsum, extra = ctx.saved_tensors
        coef = grad_loss.to(row_max.dtype).reshape(()) / queries.shape[0]
        grads = (None, None, None)
        if any(ctx.needs_input_grad[:3]):
            grads = rows.grads(queries, keys, inv_q, inv_k, s, b, (row_max, row_logsum),
                               ctx.label_offset, coef, tuple(ctx.needs_input_grad[:3]),
                               ctx.scale_meta)
        return _row_loss_grads(ctx, grads, grad_loss, extra, row_max, row_logsum, coef)


def row_forward(ctx, rows, queries, keys, scale, bias, label_offset: int, extra_logits):
    """``RowCrossEntropyFunction``'s forward on the primitives ``rows``."""
    inv_q, inv_k, s, b = rows.prepare(queries, keys, scale, bias)
    row_max, row_sum, diag = rows.stats(queries, keys, inv_q, inv_k, s, b, label_offset)
    extra = with_bias(extra_logits, None if b is None else b.reshape(()))
    if extra is not None:
        row_max, row_sum = merge_extra_logits(row_max, row_sum, extra)
    row_logsum = torch.log(row_sum)
    loss = ((row_max - diag) + row_logsum).mean()
    ctx.save_for_backward(queries, keys, s, b, inv_q, inv_k, row_max, row_logsum, extra)
    ctx.rows = rows
    ctx.label_offset = label_offset
    ctx.scale_meta = (scale.shape, scale.dtype)
    ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
    return loss


def _row_loss_grads(ctx, feature_and_scale_grads, grad_loss, extra, row_max, row_logsum, coef):
    """The gradients for all of a row Function's inputs: (queries, keys,
    scale) as given, the bias's exact zero, None for the options, and the
    extra logits' softmax probabilities when ``apply`` was called with them
    (its last input)."""
    needs = ctx.needs_input_grad
    grads = list(feature_and_scale_grads) + [None] * (len(needs) - 3)
    if needs[3]:
        grads[3] = exact_zero_bias_grad(row_logsum, row_logsum, grad_loss.to(row_max.dtype),
                                        *ctx.bias_meta)
    if extra is not None and needs[-1]:
        grads[-1] = extra_logits_grad(extra, row_max, row_logsum, coef)
    return tuple(grads)


def clip_forward_result(inv_x, inv_y, row_max, row_sum, col_max, col_sum, diag):
    """A CLIP forward's (loss, stats) from complete (max, sum exp) statistics
    and the label logits: what every backend's forward returns."""
    row_logsum, col_logsum = torch.log(row_sum), torch.log(col_sum)
    loss = clip_loss_from_stats(row_max, row_logsum, col_max, col_logsum, diag)
    return loss, pack_stats(inv_x, inv_y, row_max, row_logsum, col_max, col_logsum)
