"""The CLIP loss across ranks on torch.distributed (NCCL on GPUs, gloo on CPU).

Two families of modes, both reached through ``clipfast.ClipLoss``:

* open_clip's gather modes (``local_loss``, ``gather_with_grad``): every rank
  all-gathers the features. With ``local_loss=False`` each rank computes the
  full symmetric loss over the gathered batch with the fused backends; with
  ``local_loss=True`` it computes its own rows (images against all texts, texts
  against all images, labels offset by rank).
* the ring mode (``ring=True``): no rank ever holds more than two blocks of
  the other ranks' features. Text-feature blocks travel around the ring (each
  hop posted with batched isend/irecv before the block's compute, so it
  overlaps); each block's column statistics travel with it and return to their
  owner complete. Backward sends the blocks round again together with their
  partial gradients. Memory per rank is O(local N * d), whatever the world size.

Gradient convention (all exact modes): each rank's gradients are world_size
times its share of the gradient of the global loss, so DistributedDataParallel's
mean over ranks, applied to the encoders' and to the replicated logit_scale's
gradients, gives exactly the gradient of the single-process loss on the
concatenated batch. This is what open_clip's ``gather_with_grad=True`` gives
too. ``gather_with_grad=False`` gives gradients scaled by 1/world_size
(``local_loss=False``) or wrong ones (``local_loss=True``); both warn.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ._inputs import LossInputs
from .chunked import (
    DEFAULT_CHUNK_ELEMENTS,
    ChunkedRowCrossEntropyFunction,
    block_backward,
    block_forward,
    compute_dtype,
    exact_zero_bias_grad,
    features_grad,
    inverse_norms,
    merge_split_stats,
    unit_rows,
)


def mode_warning(local_loss: bool, gather_with_grad: bool, ring: bool, world_size: int) -> Optional[str]:
    """The warning a distributed mode deserves, or None when its gradients are exact."""
    if world_size <= 1 or ring or gather_with_grad:
        return None
    if local_loss:
        return (
            "ClipLoss(local_loss=True, gather_with_grad=False) gives wrong gradients: each "
            "rank's features miss the gradient of the other ranks' losses, in which they "
            "appear as negatives. Use gather_with_grad=True or ring=True."
        )
    return (
        f"ClipLoss(local_loss=False, gather_with_grad=False) gives feature gradients "
        f"scaled by 1/world_size (1/{world_size}) after DistributedDataParallel's "
        "averaging, while logit_scale's gradient is exact. Use gather_with_grad=True "
        "or ring=True for exact gradients."
    )


def _peers(group) -> Tuple[int, int, int, int]:
    """(rank, world_size, global rank of the next, of the previous rank) in ``group``."""
    rank = dist.get_rank(group)
    world_size = dist.get_world_size(group)
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
    if group is not None:
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    return rank, world_size, nxt, prv


def check_equal_batches(local_n: int, device: torch.device, group=None) -> None:
    """Raise the same ValueError on every rank when local batch sizes differ.

    Every rank takes part in the same all_gather and sees the same sizes, so
    they all raise together instead of hanging in a later collective.
    """
    world_size = dist.get_world_size(group)
    size = torch.tensor([local_n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"distributed ClipLoss needs the same local batch size on every rank, got "
            f"{sizes} (rank: batch size); pad or drop the last partial batch"
        )


def gather_features(image_features, text_features, local_loss=False, gather_with_grad=False,
                    rank=0, world_size=1, group=None):
    """All-gather both feature matrices, as open_clip's ``gather_features``.

    With ``gather_with_grad`` the gather is PyTorch's autograd-aware all_gather
    (its backward sums every rank's gradient into the owner's slot). Without
    it, only this rank's own slot (the local tensor itself) carries gradient,
    and with ``local_loss`` not even that (the loss uses the local tensors).
    """
    if gather_with_grad:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            # Deprecated in favour of a private API; still the public autograd gather.
            warnings.simplefilter("ignore", FutureWarning)
            all_image = torch.cat(all_gather(image_features.contiguous(), group=group or dist.group.WORLD))
            all_text = torch.cat(all_gather(text_features.contiguous(), group=group or dist.group.WORLD))
        return all_image, all_text
    gathered = []
    for features in (image_features, text_features):
        parts = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(parts, features.detach().contiguous(), group=group)
        if not local_loss:
            parts[rank] = features
        gathered.append(torch.cat(parts))
    return gathered[0], gathered[1]


def local_clip_loss(inputs: LossInputs, all_image, all_text, rank: int, normalize: bool,
                    chunk_elements: Optional[int] = None) -> torch.Tensor:
    """open_clip's ``local_loss``: this rank's rows against every column."""
    n = inputs.image_features.shape[0]
    chunk = DEFAULT_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    image_to_text = ChunkedRowCrossEntropyFunction.apply(
        inputs.image_features, all_text, inputs.logit_scale, inputs.logit_bias,
        normalize, rank * n, chunk)
    text_to_image = ChunkedRowCrossEntropyFunction.apply(
        inputs.text_features, all_image, inputs.logit_scale, inputs.logit_bias,
        normalize, rank * n, chunk)
    return (image_to_text + text_to_image) / 2


# ------------------------------- ring mode --------------------------------- #


# Message tags keep the three streams between two neighbours apart.
_TAG_BLOCK, _TAG_STATS, _TAG_GRAD = 1, 2, 3


def _exchange(send: List[torch.Tensor], recv: List[torch.Tensor], nxt: int, prv: int, group,
              tag: int):
    """Post sends to the next rank and receives from the previous one; returns the requests."""
    ops = [dist.P2POp(dist.isend, t, nxt, group, tag) for t in send]
    ops += [dist.P2POp(dist.irecv, t, prv, group, tag) for t in recv]
    return dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for request in requests:
        request.wait()


class RingClipLossFunction(torch.autograd.Function):
    """Global symmetric CLIP loss over every rank's batch, by ring exchange."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, normalize: bool, chunk_elements: int, group):
        rank, world_size, nxt, prv = _peers(group)
        n = x.shape[0]
        dtype = compute_dtype(x, y)
        s = scale.detach().reshape(()).to(dtype)
        b = bias.detach().reshape(()).to(dtype) if bias is not None else None
        inv_x = inverse_norms(x, normalize, dtype)
        inv_y = inverse_norms(y, normalize, dtype)
        x_unit = unit_rows(x, inv_x)

        row_max_parts, row_sum_parts = [], []
        block, block_inv = y.detach().contiguous(), inv_y
        # The travelling block's column statistics, merged by every rank it visits.
        col_max = torch.full((n,), float("-inf"), dtype=dtype, device=x.device)
        col_sum = torch.zeros(n, dtype=dtype, device=x.device)
        diag = None
        for step in range(world_size):
            data_requests = []
            if step < world_size - 1:
                next_block, next_inv = torch.empty_like(block), torch.empty_like(block_inv)
                data_requests = _exchange([block, block_inv], [next_block, next_inv], nxt, prv,
                                          group, _TAG_BLOCK)
            rmax, rsum, cmax, csum, block_diag = block_forward(
                x_unit, unit_rows(block, block_inv), s, b, 0 if step == 0 else None,
                chunk_elements)
            if step == 0:
                diag = block_diag
            row_max_parts.append(rmax)
            row_sum_parts.append(rsum)
            col_max, col_sum = _merge_pair(col_max, col_sum, cmax, csum)
            if world_size > 1:
                # Hand the block's statistics on; after the last hop they are home.
                in_max, in_sum = torch.empty_like(col_max), torch.empty_like(col_sum)
                _wait(_exchange([col_max, col_sum], [in_max, in_sum], nxt, prv, group, _TAG_STATS))
                col_max, col_sum = in_max, in_sum
            _wait(data_requests)
            if step < world_size - 1:
                block, block_inv = next_block, next_inv

        row_max, row_logsum = merge_split_stats(torch.stack(row_max_parts), torch.stack(row_sum_parts))
        col_logsum = torch.log(col_sum)
        local_sum = ((row_max - diag) + row_logsum).sum() + ((col_max - diag) + col_logsum).sum()
        dist.all_reduce(local_sum, group=group)
        loss = local_sum / (2 * n * world_size)

        ctx.save_for_backward(x, y, scale, bias, inv_x, inv_y, row_max, row_logsum, col_max, col_logsum)
        ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
        ctx.options = (normalize, chunk_elements, group)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, y, scale, bias, inv_x, inv_y, row_max, row_logsum, col_max, col_logsum = ctx.saved_tensors
        normalize, chunk_elements, group = ctx.options
        need_x, need_y, need_scale, need_bias = ctx.needs_input_grad[:4]
        rank, world_size, nxt, prv = _peers(group)
        n = x.shape[0]
        dtype = row_max.dtype
        s = scale.detach().reshape(()).to(dtype)
        b = bias.detach().reshape(()).to(dtype) if bias is not None else None
        # G = (P + Q - 2I) / (2 N world) per block, times world_size (see the
        # module docstring): each rank returns world_size x its share.
        coef = grad_loss.to(dtype) / (2 * n)
        x_unit = unit_rows(x, inv_x)

        grad_x_unit = torch.zeros_like(x_unit)
        grad_s = torch.zeros((), dtype=dtype, device=x.device)
        packet = [y.detach().contiguous(), inv_y, col_max, col_logsum]
        block_grad = torch.zeros(n, y.shape[1], dtype=dtype, device=y.device)
        for step in range(world_size):
            data_requests = []
            if step < world_size - 1:
                next_packet = [torch.empty_like(t) for t in packet]
                data_requests = _exchange(packet, next_packet, nxt, prv, group, _TAG_BLOCK)
            block, block_inv, block_col_max, block_col_logsum = packet
            gx, gy, gs = block_backward(
                x_unit, unit_rows(block, block_inv), s, b, (row_max, row_logsum),
                (block_col_max, block_col_logsum), 0 if step == 0 else None, coef, coef,
                chunk_elements, need_x=True, need_y=need_y)
            grad_x_unit += gx
            grad_s += gs
            if need_y:
                block_grad += gy
                if world_size > 1:
                    incoming = torch.empty_like(block_grad)
                    _wait(_exchange([block_grad], [incoming], nxt, prv, group, _TAG_GRAD))
                    block_grad = incoming
            _wait(data_requests)
            if step < world_size - 1:
                packet = next_packet

        grad_x = features_grad(grad_x_unit, x, inv_x, normalize) if need_x else None
        grad_y = features_grad(block_grad, y, inv_y, normalize) if need_y else None
        grad_scale = grad_s.reshape(scale.shape).to(scale.dtype) if need_scale else None
        grad_bias = None
        if need_bias:
            grad_bias = exact_zero_bias_grad(row_logsum, col_logsum, grad_loss.to(dtype), *ctx.bias_meta)
        return grad_x, grad_y, grad_scale, grad_bias, None, None, None


def _merge_pair(max_a, sum_a, max_b, sum_b):
    new_max = torch.maximum(max_a, max_b)
    return new_max, sum_a * torch.exp(max_a - new_max) + sum_b * torch.exp(max_b - new_max)


def distributed_clip_loss(inputs: LossInputs, *, local_loss: bool, gather_with_grad: bool,
                          ring: bool, rank: int, world_size: int, normalize: bool, backend: str,
                          group=None, chunk_elements: Optional[int] = None) -> torch.Tensor:
    """The loss of ``ClipLoss`` when world_size > 1 (see the module docstring)."""
    from .api import clip_loss

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"ClipLoss(world_size={world_size}) needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group) before the loss is computed"
        )
    actual = dist.get_world_size(group)
    if actual != world_size or dist.get_rank(group) != rank:
        raise ValueError(
            f"ClipLoss was built with rank={rank}, world_size={world_size} but the process "
            f"group has rank {dist.get_rank(group)} of {actual}"
        )
    check_equal_batches(inputs.image_features.shape[0], inputs.image_features.device, group)
    if ring:
        chunk = DEFAULT_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        return RingClipLossFunction.apply(
            inputs.image_features, inputs.text_features, inputs.logit_scale, inputs.logit_bias,
            normalize, chunk, group)
    all_image, all_text = gather_features(
        inputs.image_features, inputs.text_features, local_loss, gather_with_grad,
        rank, world_size, group)
    if local_loss:
        return local_clip_loss(inputs, all_image, all_text, rank, normalize, chunk_elements)
    return clip_loss(all_image, all_text, inputs.logit_scale, logit_bias=inputs.logit_bias,
                     normalize=normalize, backend=backend)
