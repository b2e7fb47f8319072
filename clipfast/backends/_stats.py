"""Softmax-statistics helpers shared by the backends' Python sides.

A softmax over columns that arrive in pieces (row chunks, tiles, other
ranks' blocks, hard-negative columns) is carried as a (max, sum exp(L - max))
pair per row or column; ``merge_logsumexp`` merges two such pairs,
``merge_partial_sums`` k of them stacked, and
``clip_loss_from_stats`` turns complete pairs into the loss.
"""

from __future__ import annotations

import torch


def merge_logsumexp(max_a, sum_a, max_b, sum_b):
    """(max, sum exp(L - max)) of the union of two sets of logits, from each
    set's pair. An empty set is (-inf, 0); two empty sets stay empty."""
    new_max = torch.maximum(max_a, max_b)
    # exp(-inf - -inf) is NaN: where both are empty, shift by 0 instead.
    safe_max = torch.where(torch.isinf(new_max) & (new_max < 0), torch.zeros_like(new_max), new_max)
    return new_max, sum_a * torch.exp(max_a - safe_max) + sum_b * torch.exp(max_b - safe_max)


def merge_partial_sums(part_max, part_sum):
    """Merge k (max, sum exp(L - max)) partials stacked on dim 0 into one
    (max, sum) pair: the Triton forward's per-split statistics, in one pass
    rather than k - 1 pairwise merges."""
    total_max = part_max.max(dim=0).values
    return total_max, (part_sum * torch.exp(part_max - total_max[None, :])).sum(dim=0)


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


def with_bias(extra_logits, bias):
    """The extra logits (without bias) plus the bias, in the bias's dtype."""
    if extra_logits is None:
        return None
    extra = extra_logits.detach().to(row_dtype(extra_logits, bias))
    return extra if bias is None else extra + bias


def row_dtype(extra_logits, bias):
    return extra_logits.dtype if bias is None else torch.promote_types(extra_logits.dtype, bias.dtype)


def merge_extra_logits(row_max, row_sum, extra):
    """Fold per-row extra logits (M x k: each query's own further columns,
    e.g. its hard negatives) into the rows' (max, sum exp) statistics."""
    extra = extra.to(row_max.dtype)
    extra_max = extra.max(dim=1).values
    extra_sum = torch.exp(extra - extra_max[:, None]).sum(dim=1)
    return merge_logsumexp(row_max, row_sum, extra_max, extra_sum)


def extra_logits_grad(extra, row_max, row_logsum, coef):
    """d loss / d extra logits: their softmax probabilities (never labels)."""
    prob = torch.exp((extra.to(row_max.dtype) - row_max[:, None]) - row_logsum[:, None])
    return prob * coef
