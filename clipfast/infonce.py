"""InfoNCE beyond CLIP's one-hot diagonal: hard negatives, multiple positives,
label smoothing, one-direction losses.

Text-embedding trainers (sentence-transformers' MultipleNegativesRankingLoss,
DPR, E5, GTE) score each query against every key of the batch plus extra
negative columns, in one direction; batches with duplicate captions want every
pair of a group to count as positive; some trainers smooth the labels. With
``L = s * Q^ K^T + b`` (rows L2-normalised when ``normalize``) and C the
columns of a row, each direction's loss is PyTorch's

    cross_entropy(L, T, label_smoothing=eps)
        = mean_i [ lse_i(L) - (1 - eps) sum_c T_ic L_ic - eps mean_c L_ic ],

T_i uniform over the keys that share query i's group (one-hot on i without
``labels``). The symmetric loss averages it with the keys -> queries
direction over the N queries (extra negatives are never queries).

The fused backends provide lse_i - L_ii (the one-hot loss, CLIP's op or the
row-direction block Functions); everything else in the formula is linear in
the logits and, summed over a row, needs only group sums and column means of
the normalised rows: O(N d) in plain, differentiable PyTorch. So multiple
positives and label smoothing cost nothing on any backend, and hard
negatives join the rows' softmax inside the block primitives:

* shared negatives (M, d): the rows run against [keys; negatives] (N x (N+M)),
* per-query negatives (N, k, d): the k logits of each query are merged into
  its row statistics (``extra_logits`` of the row-direction Functions).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ._collectives import check_rank_agreement, gather_no_grad, gather_with_grad, world
from ._inputs import (LossInputs, ScaleLike, check_inputs, check_memory_budget,
                      poison_invalid_scalars, resolve_tf32)
from .backends import ROWS
from .backends.reference import safe_normalize
from .dispatch import CLIP, resolve


def _check_options(inputs: LossInputs, negative_features, labels, label_smoothing):
    n, d = inputs.image_features.shape
    device = inputs.image_features.device
    if negative_features is not None:
        if not isinstance(negative_features, torch.Tensor):
            raise TypeError(f"negative_features must be a torch.Tensor, got "
                            f"{type(negative_features).__name__}")
        shape = tuple(negative_features.shape)
        if negative_features.dim() not in (2, 3) or shape[-1] != d or (
                negative_features.dim() == 3 and shape[0] != n):
            raise ValueError(
                f"negative_features must be (M, d) shared negatives or (N, k, d) per-query "
                f"negatives with N = {n}, d = {d}; got shape {shape}")
        if not negative_features.is_floating_point():
            raise TypeError(f"negative_features must be floating point, got {negative_features.dtype}")
        if negative_features.device != device:
            raise ValueError(f"negative_features is on {negative_features.device} but the "
                             f"features are on {device}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be an integer torch.Tensor, got {type(labels).__name__}")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) (one group id per pair), got "
                             f"{tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer group ids, got {labels.dtype}")
        if labels.device != device:
            raise ValueError(f"labels is on {labels.device} but the features are on {device}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or \
            not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")


# --------------------------------------------------------------------------- #
# The specification: N x C logits and F.cross_entropy.
# --------------------------------------------------------------------------- #


def group_targets(labels: Optional[torch.Tensor], n: int, dtype, device) -> torch.Tensor:
    """(N, N) target distribution: uniform over each row's group (identity
    without labels)."""
    if labels is None:
        return torch.eye(n, dtype=dtype, device=device)
    same = (labels[:, None] == labels[None, :]).to(dtype)
    return same / same.sum(dim=1, keepdim=True)


def reference_info_nce_loss(queries, keys, logit_scale, logit_bias=None, *, normalize=True,
                            negative_features=None, labels=None, label_smoothing=0.0,
                            symmetric=False) -> torch.Tensor:
    """The loss with every logit materialised, in the features' promoted dtype."""
    dtype = torch.promote_types(queries.dtype, keys.dtype)
    if negative_features is not None:
        dtype = torch.promote_types(dtype, negative_features.dtype)
    unit = safe_normalize if normalize else (lambda t: t)
    q, k = unit(queries.to(dtype)), unit(keys.to(dtype))
    s = logit_scale.reshape(()).to(dtype)
    b = 0 if logit_bias is None else logit_bias.reshape(()).to(dtype)
    n = q.shape[0]
    row_logits = s * (q @ k.t()) + b
    targets = group_targets(labels, n, dtype, q.device)
    row_targets = targets
    if negative_features is not None:
        neg = unit(negative_features.to(dtype))
        if neg.dim() == 2:
            extra = s * (q @ neg.t()) + b
        else:
            extra = s * torch.einsum("nd,nkd->nk", q, neg) + b
        row_logits = torch.cat([row_logits, extra], dim=1)
        row_targets = torch.cat([targets, targets.new_zeros(n, extra.shape[1])], dim=1)
    loss = F.cross_entropy(row_logits, row_targets, label_smoothing=float(label_smoothing))
    if symmetric:
        col_logits = (s * (q @ k.t()) + b).t()
        col_loss = F.cross_entropy(col_logits, targets.t().contiguous(),
                                   label_smoothing=float(label_smoothing))
        loss = (loss + col_loss) / 2
    return loss


# --------------------------------------------------------------------------- #
# The fused composition.
# --------------------------------------------------------------------------- #


def _group_mean(rows: torch.Tensor, row_labels: torch.Tensor,
                query_labels: torch.Tensor) -> torch.Tensor:
    """For each query i: the mean of the rows j with row_labels[j] == query_labels[i]
    (every query label occurs among the row labels: its own positive's).

    A group's id is the position of its label's first occurrence in the
    sorted row labels: in [0, R) whatever the label values, so every shape
    here is static (torch.compile traces it; torch.unique's group count would
    not be).
    """
    sorted_labels, _ = torch.sort(row_labels)
    group = torch.searchsorted(sorted_labels, row_labels)
    query_group = torch.searchsorted(sorted_labels, query_labels)
    r = row_labels.shape[0]
    sums = rows.new_zeros(r, rows.shape[1]).index_add(0, group, rows)
    counts = rows.new_zeros(r).index_add(0, group, rows.new_ones(r))
    return sums[query_group] / counts[query_group][:, None]


def _linear_terms(q, k, neg, scale, q_labels, k_labels, label_smoothing, offset: int,
                  row_direction: bool):
    """mean_i [L_i,i+offset - (1 - eps) sum_c T_ic L_ic - eps mean_c L_ic]
    without the bias (it cancels): what turns the one-hot loss
    lse_i - L_i,i+offset into the loss with these targets. ``k`` holds every
    key column (all ranks' under gather_across_devices), query i's positive
    at i + offset. O(N d)."""
    eps = float(label_smoothing)
    diag = (q * k[offset:offset + q.shape[0]]).sum(dim=1)
    target = diag if q_labels is None else (q * _group_mean(k, k_labels, q_labels)).sum(dim=1)
    term = diag - (1 - eps) * target
    if eps:
        if row_direction and neg is not None and neg.dim() == 3:
            columns = k.sum(dim=0)[None, :] + neg.sum(dim=1)  # (N, d): each row its own
            count = k.shape[0] + neg.shape[1]
            mean_logit = (q * columns).sum(dim=1) / count
        else:
            columns = k.sum(dim=0)
            count = k.shape[0]
            if row_direction and neg is not None:
                columns = columns + neg.sum(dim=0)
                count += neg.shape[0]
            mean_logit = q @ (columns / count)
        term = term - eps * mean_logit
    return scale * term.mean()


def _gathered(q, k, negative_features, labels, symmetric: bool, group):
    """(rank, all queries, all keys, all shared negatives, all labels) across
    the ranks of ``group``, gathered with gradients in rank order: this
    rank's queries score against every rank's keys (and shared negatives),
    its keys against every rank's queries (``symmetric``). Per-query
    negatives stay local. One process: the inputs themselves."""
    rank, world_size = world(group)
    if world_size == 1:
        return 0, q, k, negative_features, labels
    shared = negative_features is not None and negative_features.dim() == 2
    check_rank_agreement(
        "info_nce_loss(gather_across_devices=True)", q, k, group,
        **{"number of shared negatives": negative_features.shape[0] if shared else -1,
           "labels given": int(labels is not None)})
    all_q = gather_with_grad(q, group) if symmetric else q
    all_k = gather_with_grad(k, group)
    all_neg = gather_with_grad(negative_features, group) if shared else negative_features
    all_labels = None if labels is None else gather_no_grad(labels, group)
    return rank, all_q, all_k, all_neg, all_labels


def info_nce_from_inputs(inputs: LossInputs, backend: str, *, normalize: bool, negative_features,
                         labels, label_smoothing: float, symmetric: bool,
                         allow_tf32: Optional[bool], chunk_elements: Optional[int],
                         panel_size: Optional[int], memory_budget: Optional[float] = None,
                         gather_across_devices: bool = False, group=None):
    """The loss on validated inputs, on ``backend`` (a name, or auto): the
    one-hot part on the backend's CLIP operator (symmetric, no extra
    negatives, one process) or row loss, the linear part here."""
    _check_options(inputs, negative_features, labels, label_smoothing)
    if not isinstance(gather_across_devices, bool):
        raise TypeError(f"gather_across_devices must be a bool, got "
                        f"{type(gather_across_devices).__name__}")
    q, k = inputs.image_features, inputs.text_features
    rank, all_q, all_k, all_neg, all_labels = 0, q, k, negative_features, labels
    if gather_across_devices:
        rank, all_q, all_k, all_neg, all_labels = _gathered(q, k, negative_features, labels,
                                                            symmetric, group)
    gathered = all_k is not k
    offset = rank * q.shape[0]
    needs_rows = negative_features is not None or not symmetric or gathered
    chosen = resolve(backend, inputs, ROWS if needs_rows else CLIP)
    block = chosen.block(chunk_elements, panel_size)
    budget = check_memory_budget(memory_budget)
    allow_tf32 = resolve_tf32(allow_tf32)
    scale, bias = inputs.logit_scale, inputs.logit_bias
    per_query = negative_features is not None and negative_features.dim() == 3
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    unit = safe_normalize if normalize else (lambda t: t)
    # Unit rows in the compute dtype, only where the O(N d) terms need them.
    linear = labels is not None or bool(label_smoothing)
    q_unit = unit(q.to(dtype)) if linear or per_query else None
    neg_unit = None
    if negative_features is not None and (per_query or linear):
        neg_unit = unit(all_neg.to(dtype))
    s = scale.reshape(()).to(dtype)

    if symmetric and negative_features is None and not gathered:
        one_hot = chosen.clip_op()(q, k, scale, bias, normalize, allow_tf32, block, budget)
    else:
        row = chosen.row_loss(normalize, allow_tf32, block, budget)
        keys = all_k
        extra = None
        if negative_features is not None and not per_query:
            keys = torch.cat([all_k, all_neg.to(k.dtype)])
        elif per_query:
            # Each query's own k logits, without the bias (added inside).
            extra = s * torch.einsum("nd,nkd->nk", q_unit, neg_unit)
        one_hot = row(q, keys, scale, bias, offset, extra)
        if symmetric:
            one_hot = (one_hot + row(k, all_q, scale, bias, offset, None)) / 2
    if not linear:
        return poison_invalid_scalars(one_hot.to(inputs.loss_dtype), inputs)
    all_k_unit = unit(all_k.to(dtype))
    terms = _linear_terms(q_unit, all_k_unit, neg_unit, s, labels, all_labels, label_smoothing,
                          offset, True)
    if symmetric:
        k_unit = unit(k.to(dtype))
        all_q_unit = q_unit if all_q is q else unit(all_q.to(dtype))
        terms = (terms + _linear_terms(k_unit, all_q_unit, None, s, labels, all_labels,
                                       label_smoothing, offset, False)) / 2
    return poison_invalid_scalars((one_hot + terms).to(inputs.loss_dtype), inputs)


def info_nce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: ScaleLike,
    *,
    logit_bias: Optional[ScaleLike] = None,
    negative_features: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    symmetric: bool = False,
    normalize: bool = True,
    backend: str = "auto",
    allow_tf32: Optional[bool] = None,
    chunk_elements: Optional[int] = None,
    panel_size: Optional[int] = None,
    memory_budget: Optional[float] = None,
    gather_across_devices: bool = False,
    group=None,
) -> torch.Tensor:
    """InfoNCE of queries against keys (+ hard negatives), O(N) memory.

    ``cross_entropy(s * Q^ [K^; negatives^]^T + b, targets, label_smoothing)``
    over the N queries, averaged with the keys -> queries direction when
    ``symmetric`` (``clip_loss`` is the symmetric case without extras).
    sentence-transformers' MultipleNegativesRankingLoss with cos_sim and
    scale 20 is ``info_nce_loss(anchors, positives, 20.0,
    negative_features=negatives)`` (its negatives are shared columns).

    Args:
        queries: (N, d) tensor (float16/bfloat16/float32; float64 on reference
            and chunked).
        keys: (N, d) tensor; key i is query i's positive.
        logit_scale: the scale s (a constant float, or a learnable tensor that
            gets its gradient).
        logit_bias: optional constant added to every logit.
        negative_features: (M, d) negatives shared by every query, or
            (N, k, d) per-query negatives (row i scores only its own k).
            Gradients flow to them.
        labels: optional (N,) integer group ids: every (query i, key j) with
            labels[i] == labels[j] is a positive, the target spread uniformly
            over them (multi-positive InfoNCE / SupCon-style), both directions.
        label_smoothing: as ``F.cross_entropy``'s, per row over its columns.
        symmetric: add the keys -> queries direction (over the N queries).
        normalize: L2-normalise queries, keys and negatives (cosine
            similarity, as text-embedding trainers use). Default True.
        backend: "auto", "reference", "chunked", "triton", "hybrid", "cpu" or
            "cuda" (its one-direction rows run on Triton's row kernels).
        allow_tf32, chunk_elements, panel_size, memory_budget: as ``clip_loss``'s.
        gather_across_devices: under torch.distributed, score this rank's
            queries against every rank's keys and shared negatives (and, when
            ``symmetric``, its keys against every rank's queries), all-gathered
            with gradients, as sentence-transformers'
            ``gather_across_devices=True``: query i's positive is key
            ``rank * N + i``; ``labels`` are gathered too, so groups span
            ranks. The loss is this rank's mean; under DDP's gradient
            averaging that gives the gradient of the loss over the global
            batch. Every rank needs the same N (and M): a mismatch is the same
            ValueError on every rank. Without an initialised process group it
            changes nothing.
        group: the process group of ``gather_across_devices`` (default: the
            world).

    Returns:
        0-dim tensor (float32 for half-precision inputs).
    """
    inputs = check_inputs(queries, keys, logit_scale, logit_bias, names=("queries", "keys"))
    return info_nce_from_inputs(
        inputs, backend, normalize=normalize, negative_features=negative_features, labels=labels,
        label_smoothing=label_smoothing, symmetric=symmetric, allow_tf32=allow_tf32,
        chunk_elements=chunk_elements, panel_size=panel_size, memory_budget=memory_budget,
        gather_across_devices=gather_across_devices, group=group)
