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

import dataclasses
import warnings
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ._collectives import check_rank_agreement
from ._collectives import gather_with_grad as gather_with_grad_
from ._inputs import LossInputs, resolve_tf32
from .api import clip_loss_from_inputs
from .backends import ROWS, get
from .backends._ops import (DISTRIBUTED_DOUBLE_BACKWARD, exact_zero_bias_grad, refuse_double_backward,
                            without_autocast)
from .backends._stats import merge_logsumexp
from .dispatch import block_backend as block_backend_for
from .dispatch import resolve


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


def check_process_group(module: str, rank: int, world_size: int, group=None) -> None:
    """Raise when torch.distributed is not initialised, or when the module's
    rank / world_size are not those of the process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{module}(world_size={world_size}) needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group) before the loss is computed"
        )
    actual = dist.get_world_size(group)
    if actual != world_size or dist.get_rank(group) != rank:
        raise ValueError(
            f"{module} was built with rank={rank}, world_size={world_size} but the process "
            f"group has rank {dist.get_rank(group)} of {actual}"
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
        return gather_with_grad_(image_features, group), gather_with_grad_(text_features, group)
    gathered = []
    for features in (image_features, text_features):
        parts = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(parts, features.detach().contiguous(), group=group)
        if not local_loss:
            parts[rank] = features
        gathered.append(torch.cat(parts))
    return gathered[0], gathered[1]


def local_clip_loss(inputs: LossInputs, all_image, all_text, rank: int, normalize: bool,
                    block_backend: str, block: int = 0, allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """open_clip's ``local_loss``: this rank's rows against every column."""
    n = inputs.image_features.shape[0]
    row = get(block_backend).row_loss(normalize, resolve_tf32(allow_tf32), block)
    terms = [row(queries, keys, inputs.logit_scale, inputs.logit_bias, rank * n, None)
             for queries, keys in ((inputs.image_features, all_text),
                                   (inputs.text_features, all_image))]
    return (terms[0] + terms[1]) / 2


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
    @without_autocast
    def forward(ctx, x, y, scale, bias, normalize: bool, block_backend: str, block_size: int,
                allow_tf32: bool, group):
        rank, world_size, nxt, prv = _peers(group)
        n = x.shape[0]
        ops = get(block_backend).block_ops()(x, y, normalize, block_size, allow_tf32)
        s, b = ops.scalars(scale, bias)
        inv_x, inv_y = ops.inverse_norms(x), ops.inverse_norms(y)

        # Running statistics: row ones for this rank's rows, and the travelling
        # block's column ones, merged by every rank it visits.
        row_max = torch.full((n,), float("-inf"), dtype=inv_x.dtype, device=x.device)
        row_sum = torch.zeros(n, dtype=inv_x.dtype, device=x.device)
        block, block_inv = y.detach().contiguous(), inv_y
        col_max = torch.full((n,), float("-inf"), dtype=inv_y.dtype, device=x.device)
        col_sum = torch.zeros(n, dtype=inv_y.dtype, device=x.device)
        diag = None
        for step in range(world_size):
            data_requests = []
            if step < world_size - 1:
                next_block, next_inv = torch.empty_like(block), torch.empty_like(block_inv)
                data_requests = _exchange([block, block_inv], [next_block, next_inv], nxt, prv,
                                          group, _TAG_BLOCK)
            rmax, rsum, cmax, csum, block_diag = ops.stats(
                x, inv_x, block, block_inv, s, b, 0 if step == 0 else None)
            if step == 0:
                diag = block_diag
            row_max, row_sum = merge_logsumexp(row_max, row_sum, rmax, rsum)
            col_max, col_sum = merge_logsumexp(col_max, col_sum, cmax, csum)
            if world_size > 1:
                # Hand the block's statistics on; after the last hop they are home.
                in_max, in_sum = torch.empty_like(col_max), torch.empty_like(col_sum)
                _wait(_exchange([col_max, col_sum], [in_max, in_sum], nxt, prv, group, _TAG_STATS))
                col_max, col_sum = in_max, in_sum
            _wait(data_requests)
            if step < world_size - 1:
                block, block_inv = next_block, next_inv

        row_logsum = torch.log(row_sum)
        col_logsum = torch.log(col_sum)
        local_sum = ((row_max - diag) + row_logsum).sum() + ((col_max - diag) + col_logsum).sum()
        dist.all_reduce(local_sum, group=group)
        loss = local_sum / (2 * n * world_size)

        ctx.save_for_backward(x, y, scale, bias, inv_x, inv_y, row_max, row_logsum, col_max, col_logsum)
        ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
        ctx.options = (normalize, block_backend, block_size, allow_tf32, group)
        return loss

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss):
        refuse_double_backward("clipfast's ring mode", DISTRIBUTED_DOUBLE_BACKWARD)
        x, y, scale, bias, inv_x, inv_y, row_max, row_logsum, col_max, col_logsum = ctx.saved_tensors
        normalize, block_backend, block_size, allow_tf32, group = ctx.options
        need_x, need_y, need_scale, need_bias = ctx.needs_input_grad[:4]
        rank, world_size, nxt, prv = _peers(group)
        n, d = x.shape
        ops = get(block_backend).block_ops()(x, y, normalize, block_size, allow_tf32)
        s, b = ops.scalars(scale, bias)
        # G = (P + Q - 2I) / (2 N world) per block, times world_size (see the
        # module docstring): each rank returns world_size x its share.
        coef = grad_loss.to(row_max.dtype) / (2 * n)

        grad_x_acc = ops.new_accumulator(n, d, x.device)
        grad_s = torch.zeros((), dtype=row_max.dtype, device=x.device)
        packet = [y.detach().contiguous(), inv_y, col_max, col_logsum]
        block_grad = ops.new_accumulator(n, d, y.device) if need_y else None
        for step in range(world_size):
            data_requests = []
            if step < world_size - 1:
                next_packet = [torch.empty_like(t) for t in packet]
                data_requests = _exchange(packet, next_packet, nxt, prv, group, _TAG_BLOCK)
            block, block_inv, block_col_max, block_col_logsum = packet
            grad_s += ops.grads(
                x, inv_x, block, block_inv, s, b, (row_max, row_logsum),
                (block_col_max, block_col_logsum), 0 if step == 0 else None,
                grad_x_acc, block_grad).reshape(())
            if need_y and world_size > 1:
                incoming = torch.empty_like(block_grad)
                _wait(_exchange([block_grad], [incoming], nxt, prv, group, _TAG_GRAD))
                block_grad = incoming
            _wait(data_requests)
            if step < world_size - 1:
                packet = next_packet

        grad_x = ops.finish(grad_x_acc, x, inv_x, s, coef) if need_x else None
        grad_y = ops.finish(block_grad, y, inv_y, s, coef) if need_y else None
        grad_scale = None
        if need_scale:
            # Each rank's share of the scale gradient differs; open_clip's
            # gather mode gives every rank the whole gradient of the global
            # loss. One scalar all-reduce makes them equal, rank by rank
            # (scale is a replicated parameter, so every rank asks for it).
            grad_s = grad_s * coef
            dist.all_reduce(grad_s, group=group)
            grad_scale = (grad_s / world_size).reshape(scale.shape).to(scale.dtype)
        grad_bias = None
        if need_bias:
            grad_bias = exact_zero_bias_grad(row_logsum, col_logsum, grad_loss.to(row_max.dtype),
                                             *ctx.bias_meta)
        return grad_x, grad_y, grad_scale, grad_bias, None, None, None, None, None


def distributed_clip_loss(inputs: LossInputs, *, local_loss: bool, gather_with_grad: bool,
                          ring: bool, rank: int, world_size: int, normalize: bool, backend: str,
                          group=None, chunk_elements: Optional[int] = None,
                          allow_tf32: Optional[bool] = None,
                          memory_budget: Optional[float] = None,
                          check_ranks: bool = True) -> torch.Tensor:
    """The loss of ``ClipLoss`` when world_size > 1 (see the module docstring);
    ``check_ranks``: first check that the ranks agree (``check_rank_agreement``)."""
    check_process_group("ClipLoss", rank, world_size, group)
    if check_ranks:
        check_rank_agreement("distributed ClipLoss", inputs.image_features, inputs.text_features,
                             group, **{"logit_scale requires grad":
                                       int(inputs.logit_scale.requires_grad)})
    # The ring runs on the block primitives of the backend clip_loss would
    # run, or of its stand-in (triton for cuda, chunked for cpu and reference).
    blocks = block_backend_for(backend, inputs)
    if ring:
        return RingClipLossFunction.apply(
            inputs.image_features, inputs.text_features, inputs.logit_scale, inputs.logit_bias,
            normalize, blocks.name, blocks.block(chunk_elements, None), resolve_tf32(allow_tf32),
            group)
    all_image, all_text = gather_features(
        inputs.image_features, inputs.text_features, local_loss, gather_with_grad,
        rank, world_size, group)
    if local_loss:
        # Rectangular blocks with a label offset: the named (or auto's)
        # backend's own row loss, which every backend has.
        rows = resolve(backend, inputs, ROWS)
        return local_clip_loss(inputs, all_image, all_text, rank, normalize, rows.name,
                               rows.block(chunk_elements, None), allow_tf32)
    gathered = dataclasses.replace(inputs, image_features=all_image, text_features=all_text)
    # The gathered global loss honours the budget; the ring and local_loss
    # block modes recompute (their blocks change hands between the passes).
    return clip_loss_from_inputs(gathered, normalize=normalize, backend=backend,
                                 allow_tf32=allow_tf32, memory_budget=memory_budget)


# ------------------------------ SigLIP modes -------------------------------- #

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
_TAG_SIGLIP_LEFT, _TAG_SIGLIP_RIGHT = 4, 5


def _shift(tensors: List[torch.Tensor], towards: List[int], sources: List[int], group,
           tags: List[int]) -> List[torch.Tensor]:
    """Send tensors[i] to rank towards[i] and receive one tensor of its shape
    from sources[i], all at once; returns the received tensors."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst, group, tag)
           for t, dst, tag in zip(tensors, towards, tags)]
    ops += [dist.P2POp(dist.irecv, r, src, group, tag)
            for r, src, tag in zip(received, sources, tags)]
    _wait(dist.batch_isend_irecv(ops))
    return received


class NeighbourExchange(torch.autograd.Function):
    """Tensors travel one hop around the ring (to the left and/or the right);
    their gradients travel the same hop back to the rank that sent them."""

    @staticmethod
    def forward(ctx, group, directions, *tensors):
        # directions[i] = +1 sends tensors[i] to the right neighbour (and
        # receives from the left one), -1 the other way round.
        _, _, right, left = _peers(group)
        ctx.group, ctx.directions = group, directions
        towards = [right if s > 0 else left for s in directions]
        sources = [left if s > 0 else right for s in directions]
        tags = [_TAG_SIGLIP_RIGHT if s > 0 else _TAG_SIGLIP_LEFT for s in directions]
        return tuple(_shift(list(tensors), towards, sources, group, tags))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        back = tuple(-s for s in ctx.directions)
        return (None, None) + NeighbourExchange.forward(ctx, ctx.group, back, *grads)


def siglip_distributed_loss(inputs: LossInputs, loss_block, *, dist_impl: str, group=None,
                            check_ranks: bool = True):
    """open_clip's distributed SigLIP loss on this rank: the local block with
    positives plus, for every other rank's texts, a negatives-only block.

    ``loss_block(image_features, text_features, positives)`` computes one
    block (the fused siglip_loss). Gradients reach the other ranks' texts
    through the exchange's backward, so after DistributedDataParallel's
    averaging every parameter gets the gradient of the mean of the ranks'
    losses, as open_clip's.
    """
    if dist_impl not in SIGLIP_DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
    rank, world_size, _, _ = _peers(group)
    if check_ranks:
        check_rank_agreement("distributed SigLipLoss", inputs.image_features,
                             inputs.text_features, group)
    image, text = inputs.image_features, inputs.text_features
    loss = loss_block(image, text, True)
    if world_size == 1:
        return loss
    if dist_impl == "bidir":
        to_left = to_right = text
        pairs, odd = divmod(world_size - 1, 2)
        for _ in range(pairs):
            from_right, from_left = NeighbourExchange.apply(group, (-1, 1), to_left, to_right)
            loss = loss + loss_block(image, from_right, False) + loss_block(image, from_left, False)
            to_left, to_right = from_right, from_left
        if odd:
            (from_left,) = NeighbourExchange.apply(group, (1,), to_right)
            loss = loss + loss_block(image, from_left, False)
    elif dist_impl == "shift":
        travelling = text
        for _ in range(world_size - 1):
            (travelling,) = NeighbourExchange.apply(group, (1,), travelling)
            loss = loss + loss_block(image, travelling, False)
    else:
        from torch.distributed.nn.functional import all_gather, all_reduce

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if dist_impl == "reduce":
                # Each rank's texts in turn, summed from one non-zero contribution.
                others = [all_reduce(text * (rank == i), group=group or dist.group.WORLD)
                          for i in range(world_size)]
            else:
                others = list(all_gather(text.contiguous(), group=group or dist.group.WORLD))
        for i, other in enumerate(others):
            if i != rank:
                loss = loss + loss_block(image, other, False)
        if dist_impl == "reduce":
            # Every all-reduce's backward is a collective too: each rank must
            # run all of them, its own slot's included, or they pair up wrongly.
            loss = loss + 0 * others[rank].sum()
    return loss
