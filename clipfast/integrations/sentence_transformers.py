"""sentence-transformers' MultipleNegativesRankingLoss family, O(N) memory.

Drop-in replacements, same constructor arguments, defaults, ``forward`` and
config as the sentence-transformers classes of the same name (written
against sentence-transformers 6.3), plus two keyword arguments after theirs,
``backend="auto"`` and ``memory_budget=None`` (as ``clipfast.info_nce_loss``'s)::

    from clipfast.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)          # was losses.MultipleNegativesRankingLoss(model)

Each class subclasses the sentence-transformers class it replaces, so
``isinstance`` checks, the trainer and the model card see the original; the
embedding passes (``forward``; the GradCache machinery of the cached class,
with its RNG replay for dropout, its mini-batch boundaries and its DDP
synchronisation) are inherited unchanged. Only the loss on the embeddings is
computed here, and it never materialises the (N, C) score matrix of
sentence-transformers (C: every document column of the batch, all ranks'
under ``gather_across_devices``):

* fused (clipfast's kernels through ``info_nce_loss``, any backend):
  ``directions=("query_to_doc",)`` (either partition mode), with or without
  hard-negative columns; ``("query_to_doc", "doc_to_query")`` with
  ``partition_mode="per_direction"`` (the symmetric loss: sentence-
  transformers' mean of the two log-partitions minus the positive is the mean
  of the two cross-entropies); and the same pair with ``"joint"``, one softmax
  per row over [q_i . docs, d_i . queries], which is the row loss of the
  concatenated rows [q_i, d_i] against the keys [d_j, 0] and the extra
  columns [0, q_j] (the rows are unit-normalised first for cos_sim);
* row-chunked (exact, plain PyTorch, whatever ``backend``): what the fused
  loss cannot express, the ``"query_to_query"`` / ``"doc_to_doc"`` directions
  (their self-similarities masked out) and the hardness penalties (a
  stop-gradient term on some logits). Chunks of query rows build their
  [chunk, C] scores, take the row log-partitions and drop the scores; each
  chunk runs under ``torch.utils.checkpoint``, so the backward recomputes it.
  Peak memory is O(chunk * C) with chunk = ``CHUNK_ELEMENTS // C`` rows (all
  the rows at once without checkpointing when ``memory_budget`` bytes cover
  every chunk's saved intermediates), and the result is the formula's, not an
  approximation.

``similarity_fct`` must be ``sentence_transformers.util.cos_sim`` (or its
alias ``pytorch_cos_sim``) or ``dot_score``, or a model's ``similarity``
method resolving to one of them; anything else is a ValueError, since the
fused kernels compute only these two.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, List, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sentence_transformers import util as st_util
from sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking import (
    CachedMultipleNegativesRankingLoss as _STCachedMultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking import (
    MultipleNegativesRankingLoss as _STMultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses.multiple_negatives_symmetric_ranking import (
    MultipleNegativesSymmetricRankingLoss as _STMultipleNegativesSymmetricRankingLoss,
)

from .._collectives import check_rank_agreement, gather_with_grad, world
from .._inputs import check_memory_budget
from ..backends.reference import safe_normalize
from ..dispatch import BACKENDS
from ..infonce import info_nce_loss

__all__ = [
    "CHUNK_ELEMENTS",
    "CachedMultipleNegativesRankingLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "multiple_negatives_ranking_loss",
    "similarity_kind",
]

#: Scores per chunk of the row-chunked path: chunk rows = CHUNK_ELEMENTS // C.
CHUNK_ELEMENTS = 1 << 22

SUPPORTED_SIMILARITIES = ("cos_sim", "dot_score")
_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
_FUSED_DIRECTIONS = frozenset({"query_to_doc", "doc_to_query"})


def similarity_kind(similarity_fct: Callable) -> str:
    """``"cos_sim"`` or ``"dot_score"``: which of the two similarities that
    the fused losses compute ``similarity_fct`` is.

    Recognised: ``sentence_transformers.util.cos_sim`` (and its alias
    ``pytorch_cos_sim``) and ``dot_score``, by identity, and a model's bound
    ``similarity`` method whose ``similarity_fn_name`` resolves to one of
    them (read through ``util.similarity_fct_name``). Anything else raises a
    ValueError naming the supported functions.
    """
    cosine = {st_util.cos_sim, getattr(st_util, "pytorch_cos_sim", st_util.cos_sim)}
    if any(similarity_fct is f for f in cosine):
        return "cos_sim"
    if similarity_fct is st_util.dot_score:
        return "dot_score"
    owner = getattr(similarity_fct, "__self__", None)
    if getattr(similarity_fct, "__name__", None) == "similarity" and \
            hasattr(owner, "similarity_fn_name"):
        try:
            name = st_util.similarity_fct_name(similarity_fct)
        except (ValueError, KeyError, AttributeError):
            name = None
        if name in SUPPORTED_SIMILARITIES:
            return name
    try:
        shown = st_util.similarity_fct_name(similarity_fct)
    except Exception:  # noqa: BLE001 - only for the message
        shown = repr(similarity_fct)
    raise ValueError(
        f"clipfast's MultipleNegativesRankingLoss family supports similarity_fct="
        f"sentence_transformers.util.cos_sim or sentence_transformers.util.dot_score (or a "
        f"model's .similarity with similarity_fn_name 'cosine' or 'dot'), got {shown!r}; use "
        f"sentence_transformers.losses for other similarity functions")


def _active_hardness(hardness_mode: Optional[str], hardness_strength: float) -> Optional[str]:
    return hardness_mode if hardness_mode is not None and hardness_strength > 0.0 else None


def _unit(cosine: bool, t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.to(dtype)
    return safe_normalize(t) if cosine else t


def _joint_fused(queries, docs, scale, cosine, info_nce_kwargs):
    """Joint query_to_doc + doc_to_query as one fused row loss: row i of
    [q_i, d_i] against the keys [d_j, 0] and the extra columns [negatives, 0]
    and [0, q_j] scores exactly q_i . d_j, q_i . negative and d_i . q_j."""
    dtype = torch.promote_types(queries.dtype, docs[0].dtype)
    for d in docs[1:]:
        dtype = torch.promote_types(dtype, d.dtype)
    work = torch.promote_types(dtype, torch.float32)
    q = _unit(cosine, queries, work).to(dtype)
    ds = [_unit(cosine, d, work).to(dtype) for d in docs]
    zeros = torch.zeros_like(q)
    rows = torch.cat([q, ds[0]], dim=1)
    keys = torch.cat([ds[0], zeros], dim=1)
    extra = [torch.cat([d, torch.zeros_like(d)], dim=1) for d in ds[1:]]
    extra.append(torch.cat([zeros, q], dim=1))
    return info_nce_loss(rows, keys, scale, negative_features=torch.cat(extra), symmetric=False,
                         normalize=False, **info_nce_kwargs)


def _chunk_row_losses(q_rows, d_rows, all_queries, all_docs, scale, start, world_n: int,
                      directions: frozenset, joint: bool, hardness: Optional[str],
                      hardness_strength: float):
    """Per-row loss (log-partition minus the positive logit) of a chunk of
    rows (global rows start .. start + c): the [c, C] scores of every
    selected direction, built, masked, reduced and dropped. ``all_docs`` is
    the positives' (world_n rows), then each hard-negative column's block."""
    c = q_rows.shape[0]
    own_row = start + torch.arange(c, device=q_rows.device)  # global index of each row
    doc_cols = torch.arange(all_docs.shape[0], device=q_rows.device)
    own_doc = (doc_cols[None, :] % world_n) == own_row[:, None]  # a column of this row's pair
    positive_block = (doc_cols < world_n)[None, :]
    parts: List[Tensor] = []  # each direction's [c, columns] logits

    sim = q_rows @ all_docs.t()
    logits = scale * sim
    if hardness is not None:
        if hardness == "hard_negatives":
            penalised = own_doc & ~positive_block
        elif hardness == "in_batch_negatives":
            penalised = ~own_doc
        else:  # all_negatives: everything but the positive itself
            penalised = ~(own_doc & positive_block)
        logits = logits + hardness_strength * sim.detach() * penalised.to(sim.dtype)
    parts.append(logits)
    if "query_to_query" in directions:
        self_col = torch.arange(world_n, device=q_rows.device)[None, :] == own_row[:, None]
        parts.append((scale * (q_rows @ all_queries.t())).masked_fill(self_col, -math.inf))
    if "doc_to_query" in directions:
        parts.append(scale * (d_rows @ all_queries.t()))
    if "doc_to_doc" in directions:
        parts.append((scale * (d_rows @ all_docs.t())).masked_fill(own_doc, -math.inf))
    if joint:  # one softmax over the union of the columns
        log_z = torch.logsumexp(torch.cat(parts, dim=1), dim=1)
    else:
        log_z = torch.stack([torch.logsumexp(part, dim=1) for part in parts]).mean(dim=0)
    # The positive read from the same rounded logits as the partition, so
    # that their rounding errors cancel in the (often small) difference.
    return log_z - logits[torch.arange(c, device=logits.device), own_row]


def _chunked(queries, docs, scale, cosine, directions, joint, hardness, hardness_strength,
             gather, memory_budget, chunk_elements, group):
    dtype = queries.dtype
    for d in docs:
        dtype = torch.promote_types(dtype, d.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    q = _unit(cosine, queries, dtype)
    ds = [_unit(cosine, d, dtype) for d in docs]
    n = q.shape[0]
    if any(d.shape[0] != n for d in ds):
        raise ValueError(f"every input column needs the anchors' {n} rows, got "
                         f"{[d.shape[0] for d in ds]}")
    rank, world_size = world(group) if gather else (0, 1)
    all_q, all_ds = q, ds
    if world_size > 1:
        check_rank_agreement("MultipleNegativesRankingLoss(gather_across_devices=True)", q,
                             ds[0], group, **{"number of input columns": len(ds)})
        all_q = gather_with_grad(q, group)
        all_ds = [gather_with_grad(d, group) for d in ds]
    world_n = n * world_size
    all_docs = torch.cat(all_ds)
    scale_t = scale.to(dtype) if isinstance(scale, Tensor) else torch.tensor(
        float(scale), dtype=dtype, device=q.device)

    columns = all_docs.shape[0]
    columns += world_n * (("query_to_query" in directions) + ("doc_to_query" in directions))
    columns += all_docs.shape[0] * ("doc_to_doc" in directions)
    elements = CHUNK_ELEMENTS if chunk_elements is None else int(chunk_elements)
    if elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    rows = max(1, min(n, elements // columns))
    # A budget that holds every chunk's saved intermediates (a few [rows, C]
    # tensors each) keeps them instead of recomputing.
    keep = check_memory_budget(memory_budget) >= 4 * n * columns * q.element_size()
    recompute = torch.is_grad_enabled() and not keep

    def chunk(q_rows, d_rows, all_queries, docs_, scale_, start):
        return _chunk_row_losses(q_rows, d_rows, all_queries, docs_, scale_, start, world_n,
                                 directions, joint, hardness, hardness_strength)

    per_row = []
    for begin in range(0, n, rows):
        args = (q[begin:begin + rows], ds[0][begin:begin + rows], all_q, all_docs, scale_t,
                rank * n + begin)
        per_row.append(checkpoint(chunk, *args, use_reentrant=False) if recompute else chunk(*args))
    return torch.cat(per_row).mean()


def multiple_negatives_ranking_loss(
    embeddings: Sequence[Tensor],
    scale=20.0,
    *,
    similarity: str = "cos_sim",
    gather_across_devices: bool = False,
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: Optional[str] = None,
    hardness_strength: float = 0.0,
    backend: str = "auto",
    memory_budget: Optional[float] = None,
    chunk_elements: Optional[int] = None,
    group=None,
) -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss on embeddings.

    Args:
        embeddings: [anchors, positives, negatives_1, ...], each (N, d): the
            documents of every column are shared candidates of every anchor.
        scale: multiplies the similarities (1 / temperature).
        similarity: "cos_sim" or "dot_score".
        gather_across_devices, directions, partition_mode, hardness_mode,
            hardness_strength: as sentence-transformers'.
        backend, memory_budget: as ``clipfast.info_nce_loss``'s (the fused
            path); the row-chunked path runs in PyTorch whatever the backend.
        chunk_elements: scores per chunk of the row-chunked path (default
            ``CHUNK_ELEMENTS``).
        group: the process group of ``gather_across_devices``.

    Returns:
        0-dim tensor: this rank's mean over its anchors (float32 for
        half-precision embeddings).
    """
    embeddings = list(embeddings)
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    if similarity not in SUPPORTED_SIMILARITIES:
        raise ValueError(f"similarity must be one of {SUPPORTED_SIMILARITIES}, got {similarity!r}")
    cosine = similarity == "cos_sim"
    chosen = frozenset(directions)
    unknown = chosen - set(_DIRECTIONS)
    if unknown or "query_to_doc" not in chosen:
        raise ValueError(f"directions must include 'query_to_doc' and be among {_DIRECTIONS}, "
                         f"got {tuple(directions)}")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
    joint = partition_mode == "joint"
    hardness = _active_hardness(hardness_mode, hardness_strength)
    queries, docs = embeddings[0], embeddings[1:]
    gather = bool(gather_across_devices) and world(group)[1] > 1

    if hardness is None and chosen <= _FUSED_DIRECTIONS:
        kwargs = dict(backend=backend, memory_budget=memory_budget)
        if gather:
            kwargs.update(gather_across_devices=True, group=group)
        if chosen == {"query_to_doc"} or not joint:
            negatives = torch.cat(docs[1:]) if len(docs) > 1 else None
            return info_nce_loss(queries, docs[0], scale, negative_features=negatives,
                                 symmetric=len(chosen) == 2, normalize=cosine, **kwargs)
        return _joint_fused(queries, docs, scale, cosine, kwargs)
    return _chunked(queries, docs, scale, cosine, chosen, joint, hardness, hardness_strength,
                    gather, memory_budget, chunk_elements, group)


def _check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class MultipleNegativesRankingLoss(_STMultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` in O(N) memory.

    The same arguments, defaults and behaviour as
    ``sentence_transformers.losses.MultipleNegativesRankingLoss`` (read its
    documentation for ``scale``, ``similarity_fct``, ``gather_across_devices``,
    ``directions``, ``partition_mode``, ``hardness_mode`` and
    ``hardness_strength``), whose subclass it is; the loss comes from
    clipfast (fused where the options allow, else exact row chunks: see the
    module docstring).

    Args:
        backend: clipfast's backend for the fused path ("auto" picks one).
        memory_budget: as ``clipfast.info_nce_loss``'s: bytes the forward may
            keep for the backward (None: as little as it can).
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = st_util.cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: Optional[str] = None,
        hardness_strength: float = 0.0,
        *,
        backend: str = "auto",
        memory_budget: Optional[float] = None,
    ) -> None:
        similarity_kind(similarity_fct)
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, hardness_mode=hardness_mode,
                         hardness_strength=hardness_strength)
        self.backend = _check_backend(backend)
        check_memory_budget(memory_budget)
        self.memory_budget = memory_budget

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor = None) -> Tensor:
        """The loss on [anchors, positives, negatives...] embeddings (the
        labels are unused: the positive is the paired row)."""
        return multiple_negatives_ranking_loss(
            embeddings, self.scale, similarity=similarity_kind(self.similarity_fct),
            gather_across_devices=self.gather_across_devices, directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength, backend=self.backend,
            memory_budget=self.memory_budget)

    def get_config_dict(self) -> dict[str, Any]:
        """sentence-transformers' config, plus the clipfast backend."""
        return {**super().get_config_dict(), "backend": self.backend}


class CachedMultipleNegativesRankingLoss(_STCachedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (GradCache)
    with clipfast's loss.

    The same arguments and defaults as
    ``sentence_transformers.losses.CachedMultipleNegativesRankingLoss``, whose
    subclass it is: its three steps are inherited (embed every mini-batch
    without gradients, recording each one's RNG state; the loss and its
    backward to the embeddings; re-embed each mini-batch with gradients,
    replaying its RNG state so dropout draws the same masks, and backpropagate
    the cached embedding gradients). Step two, ``calculate_loss``, is
    clipfast's :class:`MultipleNegativesRankingLoss` over the whole batch (kept
    as ``self.loss``), so the loss is O(N) memory there too.

    Args:
        backend, memory_budget: as :class:`MultipleNegativesRankingLoss`'s.
    """

    _delegated_to_wrapped_loss = _STCachedMultipleNegativesRankingLoss._delegated_to_wrapped_loss + (
        "backend", "memory_budget")

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = st_util.cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: Optional[int] = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: Optional[str] = None,
        hardness_strength: float = 0.0,
        *,
        backend: str = "auto",
        memory_budget: Optional[float] = None,
    ) -> None:
        wrapped = MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength, backend=backend, memory_budget=memory_budget)
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, show_progress_bar=show_progress_bar,
                         hardness_mode=hardness_mode, hardness_strength=hardness_strength)
        # The wrapped loss owns the hyperparameters (sentence-transformers'
        # design): clipfast's replaces sentence-transformers' own.
        self.loss = wrapped

    @property
    def backend(self) -> str:
        return self.loss.backend

    @property
    def memory_budget(self) -> Optional[float]:
        return self.loss.memory_budget

    def calculate_loss(self, reps: list[list[Tensor]], labels: Optional[Tensor] = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss over the whole batch from the per-mini-batch embeddings
        (one list per input column); with ``with_backward`` its backward to
        the embeddings is run and the detached loss returned."""
        embeddings = [torch.cat(column) for column in reps]
        loss = self.loss.compute_loss_from_embeddings(embeddings, labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        """sentence-transformers' config, plus the clipfast backend."""
        return {**super().get_config_dict(), "backend": self.backend}


with warnings.catch_warnings():
    # sentence-transformers deprecates its class (and warns on subclassing it)
    # in favour of MultipleNegativesRankingLoss(directions=("query_to_doc",
    # "doc_to_query"), partition_mode="per_direction"); the subclass keeps
    # isinstance checks against it working.
    warnings.simplefilter("ignore", DeprecationWarning)

    class MultipleNegativesSymmetricRankingLoss(_STMultipleNegativesSymmetricRankingLoss,
                                                MultipleNegativesRankingLoss):
        """sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``:
        :class:`MultipleNegativesRankingLoss` with ``directions=("query_to_doc",
        "doc_to_query")`` and ``partition_mode="per_direction"`` (hard-negative
        columns, if any, join the query -> document softmax, as there), fused.

        Args:
            model, scale, similarity_fct, gather_across_devices: as
                sentence-transformers'.
            backend, memory_budget: as :class:`MultipleNegativesRankingLoss`'s.
        """

        def __init__(
            self,
            model,
            scale: float = 20.0,
            similarity_fct: Callable[[Tensor, Tensor], Tensor] = st_util.cos_sim,
            gather_across_devices: bool = False,
            *,
            backend: str = "auto",
            memory_budget: Optional[float] = None,
        ) -> None:
            similarity_kind(similarity_fct)
            _check_backend(backend)
            check_memory_budget(memory_budget)
            # sentence-transformers' __init__ passes the two directions on to
            # MultipleNegativesRankingLoss's (clipfast's, next in the MRO).
            super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                             gather_across_devices=gather_across_devices)
            self.backend = backend
            self.memory_budget = memory_budget
