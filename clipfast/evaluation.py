"""Zero-shot classification and image-text retrieval metrics.

Ties are resolved in expectation: every metric is its expected value when
tied candidates are put in a uniformly random order. (Identical captions, as
in class-level datasets, are exactly tied; counting them for or against the
query would flatter or punish it arbitrarily, and argsort's choice depends on
the sort algorithm.)

Non-finite scores (NaN or infinite features, or a NaN in the classifier) give
NaN metrics, never a number: a query whose scores include a non-finite value
has no rank, so every metric computed from it is NaN. Metrics are aggregates
(means, medians, per-class means) over all queries, so in practice one
non-finite score makes each metric whose queries see it NaN: for retrieval a
NaN image row reaches every text query too, since each caption is scored
against it.

Rows are normalised by their direction alone (``safe_normalize``): features
so large that their squared norms overflow fp32 still score by their cosines.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .backends.reference import safe_normalize


@torch.no_grad()
def zero_shot_classifier(encode_text: Callable[[Sequence[str]], torch.Tensor],
                         class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(num_classes, dim) class embeddings, prompt-ensembled.

    For each class: normalise the text embedding of every template, average
    them, normalise again (CLIP's prompt ensembling).
    """
    weights = []
    for name in class_names:
        embeddings = safe_normalize(encode_text([t.format(name) for t in templates]))
        weights.append(safe_normalize(embeddings.mean(dim=0)))
    return torch.stack(weights)


def _rank_stats(scores: torch.Tensor, positives: torch.Tensor):
    """Per query: (better, tied, tied_positives) around its best positive.

    scores: (Q, C); positives: (Q, C) bool, at least one per row. ``better``
    counts negatives scoring above the best positive, ``tied`` negatives equal
    to it, ``tied_positives`` positives equal to it (>= 1). fp64 counts; all
    three are NaN for a query with any non-finite score (comparisons with NaN
    are all false, which would otherwise rank a NaN positive first).
    """
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one positive candidate")
    best = scores.masked_fill(~positives, float("-inf")).max(dim=1).values[:, None]
    better = ((scores > best) & ~positives).sum(dim=1).double()
    tied = ((scores == best) & ~positives).sum(dim=1).double()
    tied_positives = ((scores == best) & positives).sum(dim=1).double()
    undefined = ~torch.isfinite(scores).all(dim=1)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return tuple(torch.where(undefined, nan, t) for t in (better, tied, tied_positives))


def _expected_rank(better, tied, tied_positives) -> torch.Tensor:
    """Expected 0-based rank of the first positive: negatives before it among
    the tied block average tied / (tied_positives + 1)."""
    return better + tied / (tied_positives + 1)


def _hit_probability(better, tied, tied_positives, k: int) -> torch.Tensor:
    """P(a positive within the top k) under random order of the tied block.

    With m = k - better slots left, the miss probability is
    C(tied, m) / C(tied + p, m): all m slots drawn from the tied negatives.
    """
    m = (k - better).clamp_min(0)
    t, p = tied, tied_positives
    # log C(t, m) - log C(t + p, m), defined where m <= t; beyond that a hit is sure.
    log_miss = (torch.lgamma(t + 1) - torch.lgamma(t - m + 1)
                - torch.lgamma(t + p + 1) + torch.lgamma(t + p - m + 1))
    miss = torch.where(m <= t, torch.exp(log_miss), torch.zeros_like(m))
    hit = torch.where(m > 0, 1 - miss, torch.zeros_like(m))
    # The comparisons above are false for NaN: put an undefined query's NaN back.
    return torch.where(torch.isnan(better), better, hit)


@torch.no_grad()
def zero_shot_metrics(image_features: torch.Tensor, classifier: torch.Tensor,
                      labels: torch.Tensor) -> Dict[str, float]:
    """top-1, top-5 accuracy and mean per-class recall (all in [0, 1])."""
    scores = safe_normalize(image_features) @ classifier.t()
    positives = F.one_hot(labels, classifier.shape[0]).bool()
    stats = _rank_stats(scores.float().cpu(), positives.cpu())
    top1 = _hit_probability(*stats, 1)
    labels = labels.cpu()
    recalls = [top1[labels == c].mean() for c in labels.unique()]
    return {
        "top1": top1.mean().item(),
        "top5": _hit_probability(*stats, 5).mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: Optional[torch.Tensor] = None,
                      ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Image<->text retrieval under open_clip's metric names.

    ``text_to_image[j]`` is the image that caption j describes (default: the
    j-th image, one caption each). An image query counts a hit when any of its
    captions is within the top k, and its rank is its best caption's; ranks
    are 1-based as in open_clip
    (``image_to_text_mean_rank``, ``..._median_rank``, ``..._R@k`` and the same
    for ``text_to_image``).
    """
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    if text_to_image is None:
        if n_images != n_texts:
            raise ValueError(f"{n_images} images and {n_texts} texts need text_to_image")
        text_to_image = torch.arange(n_texts)
    scores = safe_normalize(image_features) @ safe_normalize(text_features).t()
    positives = torch.zeros(n_images, n_texts, dtype=torch.bool)
    positives[text_to_image, torch.arange(n_texts)] = True
    metrics = {}
    for name, s, pos in (("image_to_text", scores, positives), ("text_to_image", scores.t(), positives.t())):
        stats = _rank_stats(s.float().cpu(), pos)
        ranks = _expected_rank(*stats)
        metrics[f"{name}_mean_rank"] = ranks.mean().item() + 1
        # open_clip: floor(median of the 0-based ranks) + 1, numpy's median.
        metrics[f"{name}_median_rank"] = torch.quantile(ranks, 0.5).floor().item() + 1
        for k in ks:
            metrics[f"{name}_R@{k}"] = _hit_probability(*stats, k).mean().item()
    return metrics
