"""``nn.Module`` drop-ins for open_clip's losses: ``ClipLoss``, ``DistillClipLoss``,
``CoCaLoss`` and ``SigLipLoss``, with the contrastive term on the fused kernels."""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._inputs import LossInputs, check_inputs, check_memory_budget, resolve_tf32
from .api import clip_loss_from_inputs, siglip_loss_from_inputs
from .backends.chunked import DEFAULT_CHUNK_ELEMENTS
from .backends.reference import siglip_labels
from .dispatch import BACKENDS
from .distributed import distributed_clip_loss, gather_features, mode_warning


def _check_flag(name: str, value) -> None:
    # A truthy string such as "False" would silently switch a mode on.
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_module_options(rank, world_size, backend, normalize, allow_tf32) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_flag("normalize", normalize)
    resolve_tf32(allow_tf32)  # the type check; the value is read at each call


class _DroppedGroup:
    """What a pickled loss keeps of its process group: the global ranks in
    it. A process group is a live communicator, not data; the unpickled loss
    re-resolves it (the world when those ranks are the world) or refuses
    clearly when it cannot."""

    def __init__(self, ranks: Optional[List[int]]):
        self.ranks = ranks

    def __repr__(self) -> str:
        return f"<process group of ranks {self.ranks}, dropped when the loss was pickled>"


def _group_ranks(group) -> Optional[List[int]]:
    try:
        return list(dist.get_process_group_ranks(group))
    except (RuntimeError, ValueError, AttributeError, KeyError):
        return None


class _ProcessGroupOwner:
    """Copying and pickling for a loss that may hold a process group:
    ``copy.deepcopy`` shares the group (a communicator cannot be copied);
    ``pickle`` / ``torch.save`` drop it for ``_DroppedGroup``."""

    def __getstate__(self):
        state = self.__dict__.copy()
        group = state.get("group")
        if group is not None and not isinstance(group, _DroppedGroup):
            state["group"] = _DroppedGroup(_group_ranks(group))
        return state

    def __deepcopy__(self, memo):
        group = self.__dict__.get("group")
        if group is not None:
            memo[id(group)] = group
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _process_group(self):
        """The group to communicate in: the one given, or for an unpickled
        loss the world when its ranks were the world's."""
        group = self.group
        if not isinstance(group, _DroppedGroup):
            return group
        if dist.is_available() and dist.is_initialized() and \
                group.ranks == list(range(dist.get_world_size())):
            return None
        raise RuntimeError(
            f"{type(self).__name__} was unpickled without its process group "
            f"({group.ranks if group.ranks is not None else 'ranks unknown'}): a process group "
            "cannot be pickled. Set loss.group to the torch.distributed group to use "
            "(None for the default world group) before calling it")


class ClipLoss(_ProcessGroupOwner, nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss`` backed by the fused kernels.

    The constructor takes open_clip's arguments plus clipfast's keywords
    ``backend``, ``normalize``, ``allow_tf32``, ``ring``, ``group``,
    ``memory_budget`` (``clip_loss``'s) and ``check_ranks`` (across ranks,
    first check with one small all_gather that every rank has the same batch
    size, dims and dtypes, so a mismatch is the same ValueError on every rank;
    False skips it);
    ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` returns the loss, or ``{"contrastive_loss": loss}``
    with ``output_dict=True``, so ``loss_fn(**model_out, output_dict=True)``
    works as in open_clip.

    ``normalize=False`` (the default) is open_clip's loss on whatever features
    it is given. ``normalize=True`` L2-normalises the rows inside the fused op
    (forward and backward) instead of in the model: drop the model's
    ``F.normalize`` and pass ``normalize=True`` to save the N x d normalised
    copies and their backward. On features the model already normalised,
    ``normalize=True`` gives the same loss and the same parameter gradients
    (the projection ``g - x^ <x^, g>`` is applied twice, which is once). On
    unit-norm *leaf* features the feature gradient loses its radial part.

    With ``world_size > 1`` it runs on torch.distributed: open_clip's gather
    modes, or ``ring=True``, which never holds all ranks' features (see
    ``clipfast.distributed`` for the modes and the gradient convention).

    ``get_ground_truth``, ``get_logits``, ``labels``, ``prev_num_logits`` and
    ``cache_labels`` behave as open_clip's, for subclasses and user code that
    use them; ``forward`` itself never builds the labels or the N x N logits.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
        normalize: bool = False,
        allow_tf32: Optional[bool] = None,
        ring: bool = False,
        group=None,
        memory_budget: Optional[float] = None,
        check_ranks: bool = True,
    ):
        super().__init__()
        if use_horovod:
            warnings.warn("ClipLoss(use_horovod=True): horovod is not supported and the flag is "
                          "ignored; the distributed modes run on torch.distributed", stacklevel=2)
        _check_module_options(rank, world_size, backend, normalize, allow_tf32)
        check_memory_budget(memory_budget)
        if ring and local_loss:
            raise ValueError("ring=True computes the global loss; it cannot be combined with local_loss=True")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.normalize = normalize
        self.allow_tf32 = allow_tf32
        self.ring = ring
        self.group = group
        self.memory_budget = memory_budget
        _check_flag("check_ranks", check_ranks)
        self.check_ranks = check_ranks
        # open_clip's label cache, read by get_ground_truth (forward does not
        # need labels: the fused kernels know the diagonal).
        self.prev_num_logits = 0
        self.labels = {}
        message = mode_warning(local_loss, gather_with_grad, ring, world_size)
        if message is not None:
            warnings.warn(message, stacklevel=2)

    def get_ground_truth(self, device, num_logits: int) -> torch.Tensor:
        """open_clip's labels: ``arange(num_logits)``, offset by ``rank * num_logits``
        with ``local_loss`` across ranks; cached per device when ``cache_labels``
        (recomputed whenever ``num_logits`` changes)."""
        device = torch.device(device)
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
            return labels
        return self.labels[device]

    def _unit(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1) if self.normalize else features

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """``(logits_per_image, logits_per_text)`` as open_clip returns them.

        This materialises the N x N logits (the memory the fused ``forward``
        avoids); it is for code that needs the matrix itself. With
        ``normalize=True`` the features are normalised first, so that
        ``cross_entropy(logits, get_ground_truth(...))`` is ``forward``'s loss.

        Across ranks it gathers as open_clip does (``clipfast.distributed.
        gather_features``): with ``local_loss`` this rank's rows against every
        rank's columns, else the global matrix, ``logits_per_text`` being its
        transpose. ``ring=True`` gathers with gradient (its exact gradients).
        Unlike open_clip, which adds ``logit_bias`` in place and so twice to the
        shared global matrix, the bias is added once, out of place.
        """
        inputs = check_inputs(image_features, text_features, logit_scale, logit_bias)
        image, text = self._unit(inputs.image_features), self._unit(inputs.text_features)
        if self.world_size > 1:
            gather_with_grad = self.gather_with_grad or self.ring
            all_image, all_text = gather_features(
                image, text, self.local_loss, gather_with_grad, self.rank, self.world_size,
                self._process_group())
            if self.local_loss:
                logits_per_image = logit_scale * image @ all_text.T
                logits_per_text = logit_scale * text @ all_image.T
            else:
                logits_per_image = logit_scale * all_image @ all_text.T
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image @ text.T
            logits_per_text = logit_scale * text @ image.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def _contrastive(self, inputs: LossInputs):
        if self.world_size > 1:
            loss = distributed_clip_loss(
                inputs, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                ring=self.ring, rank=self.rank, world_size=self.world_size,
                normalize=self.normalize, backend=self.backend, group=self._process_group(),
                allow_tf32=self.allow_tf32, memory_budget=self.memory_budget,
                check_ranks=self.check_ranks)
            return loss.to(inputs.loss_dtype)
        return clip_loss_from_inputs(inputs, normalize=self.normalize, backend=self.backend,
                                     allow_tf32=self.allow_tf32, memory_budget=self.memory_budget)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias: Optional[torch.Tensor] = None,
        output_dict: bool = False,
    ):
        inputs = check_inputs(image_features, text_features, logit_scale, logit_bias)
        loss = self._contrastive(inputs)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        text = (f"backend={self.backend!r}, normalize={self.normalize}, "
                f"allow_tf32={self.allow_tf32}")
        if self.world_size > 1:
            text += (f", rank={self.rank}, world_size={self.world_size}, local_loss={self.local_loss}, "
                     f"gather_with_grad={self.gather_with_grad}, ring={self.ring}")
        return text


# ----------------------------- distillation -------------------------------- #


def _rename_teacher_error(err: Exception) -> Exception:
    """The same validation error, naming the teacher's arguments."""
    message = re.sub(r"\b(image_features|text_features|logit_scale)\b", r"dist_\1", str(err))
    return type(err)(message)


def _distill_rows(queries, keys, scale, t_queries, t_keys, t_scale, start: int, stop: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Sum over rows start:stop of -sum_j softmax(teacher)_ij log_softmax(student)_ij.

    The products run in the features' dtype (tensor cores for half precision,
    as under autocast) and the softmax math in ``dtype`` (at least fp32),
    which is what autocast does with open_clip's formula.
    """
    student = (queries[start:stop] @ keys.T).to(dtype) * scale.reshape(()).to(dtype)
    teacher = (t_queries[start:stop] @ t_keys.T).to(dtype) * t_scale.reshape(()).to(dtype)
    return -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum()


def chunked_distill_term(queries, keys, scale, t_queries, t_keys, t_scale,
                         chunk_rows: Optional[int] = None) -> torch.Tensor:
    """open_clip's ``dist_loss(teacher_logits, student_logits)`` for the logits
    ``scale * queries @ keys.T`` (student) and ``t_scale * t_queries @ t_keys.T``
    (teacher), without holding either matrix.

    Rows are processed ``chunk_rows`` at a time (default: about 2^22 logits per
    chunk); each chunk is checkpointed, so autograd keeps only references to
    the inputs and the backward recomputes one chunk's logits at a time:
    memory O(chunk_rows x M) for M columns, not M x M. Not a fused kernel: each
    chunk is a few PyTorch ops on (chunk_rows, M) tensors. Gradients reach
    every input that requires grad (the teacher's too, if it does).
    """
    rows, cols = queries.shape[0], keys.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // max(cols, 1))
    dtype = torch.promote_types(
        torch.promote_types(torch.promote_types(queries.dtype, keys.dtype),
                            torch.promote_types(t_queries.dtype, t_keys.dtype)),
        torch.float32)
    # Mixed-dtype pairs cannot be multiplied; cast once here, not once per chunk.
    student_dtype = torch.promote_types(queries.dtype, keys.dtype)
    queries, keys = queries.to(student_dtype), keys.to(student_dtype)
    teacher_dtype = torch.promote_types(t_queries.dtype, t_keys.dtype)
    t_queries, t_keys = t_queries.to(teacher_dtype), t_keys.to(teacher_dtype)
    tensors = (queries, keys, scale, t_queries, t_keys, t_scale)
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    total = None
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        if recompute:
            part = checkpoint(_distill_rows, *tensors, start, stop, dtype,
                              use_reentrant=False, preserve_rng_state=False)
        else:
            part = _distill_rows(*tensors, start, stop, dtype)
        total = part if total is None else total + part
    return total / rows


class DistillClipLoss(ClipLoss):
    """Drop-in for ``open_clip.loss.DistillClipLoss``.

    ``forward(image_features, text_features, logit_scale, dist_image_features,
    dist_text_features, dist_logit_scale, output_dict=False)`` returns
    ``(contrastive_loss, distill_loss)``, or the dict with those keys. The
    contrastive loss is ``ClipLoss``'s (the fused kernels). The distillation
    loss is open_clip's: the cross-entropy of the student's log-softmax against
    the teacher's softmax over the rows of ``logits_per_image`` and of
    ``logits_per_text``, each averaged over rows, the two averaged.

    The distillation term is not a fused kernel: it runs in chunks of
    ``distill_chunk_rows`` rows (default about 2^22 logits per chunk) with
    PyTorch ops, each chunk recomputed in backward, so its memory is
    O(chunk x N), never N x N. The teacher's dimension may differ from the
    student's. ``normalize=True`` normalises the teacher's features too (a
    no-op for a teacher that normalises its own). Across ranks the distillation
    term gathers student and teacher features as open_clip's ``get_logits``
    does (``ring=True`` is not supported here).
    """

    def __init__(self, *args, distill_chunk_rows: Optional[int] = None, **kwargs):
        if kwargs.get("ring", False):
            raise ValueError(
                "DistillClipLoss(ring=True) is not supported: the distillation term needs the "
                "gathered features; use gather_with_grad=True")
        if distill_chunk_rows is not None and (
                isinstance(distill_chunk_rows, bool) or not isinstance(distill_chunk_rows, int)
                or distill_chunk_rows < 1):
            raise ValueError(f"distill_chunk_rows must be a positive int, got {distill_chunk_rows!r}")
        super().__init__(*args, **kwargs)
        self.distill_chunk_rows = distill_chunk_rows

    def dist_loss(self, teacher_logits, student_logits):
        """open_clip's formula on materialised logits (N x N memory)."""
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    def _distill(self, student, teacher):
        image, text, scale = student
        t_image, t_text, t_scale = teacher
        image, text = self._unit(image), self._unit(text)
        t_image, t_text = self._unit(t_image), self._unit(t_text)
        if self.world_size > 1:
            all_image, all_text = gather_features(
                image, text, self.local_loss, self.gather_with_grad, self.rank, self.world_size,
                self._process_group())
            all_t_image, all_t_text = gather_features(
                t_image, t_text, self.local_loss, self.gather_with_grad, self.rank, self.world_size,
                self._process_group())
            if self.local_loss:
                directions = ((image, all_text, t_image, all_t_text),
                              (text, all_image, t_text, all_t_image))
            else:
                directions = ((all_image, all_text, all_t_image, all_t_text),
                              (all_text, all_image, all_t_text, all_t_image))
        else:
            directions = ((image, text, t_image, t_text), (text, image, t_text, t_image))
        terms = [chunked_distill_term(q, k, scale, tq, tk, t_scale, self.distill_chunk_rows)
                 for q, k, tq, tk in directions]
        return (terms[0] + terms[1]) / 2

    def forward(
        self,
        image_features,
        text_features,
        logit_scale,
        dist_image_features,
        dist_text_features,
        dist_logit_scale,
        output_dict: bool = False,
    ):
        student = check_inputs(image_features, text_features, logit_scale)
        try:
            teacher = check_inputs(dist_image_features, dist_text_features, dist_logit_scale)
        except (TypeError, ValueError) as err:
            raise _rename_teacher_error(err) from None
        if teacher.image_features.device != student.image_features.device:
            raise ValueError(
                f"dist_image_features is on {teacher.image_features.device} but image_features "
                f"is on {student.image_features.device}")
        if teacher.image_features.shape[0] != student.image_features.shape[0]:
            raise ValueError(
                f"batch size mismatch: image_features has shape "
                f"{tuple(student.image_features.shape)} and dist_image_features has shape "
                f"{tuple(teacher.image_features.shape)}; the teacher must score the same batch")
        contrastive_loss = self._contrastive(student)
        distill_loss = self._distill(
            (student.image_features, student.text_features, student.logit_scale),
            (teacher.image_features, teacher.text_features, teacher.logit_scale))
        if output_dict:
            return {"contrastive_loss": contrastive_loss, "distill_loss": distill_loss}
        return contrastive_loss, distill_loss

    def extra_repr(self) -> str:
        return super().extra_repr() + f", distill_chunk_rows={self.distill_chunk_rows}"


# --------------------------------- CoCa ------------------------------------ #


class CoCaLoss(ClipLoss):
    """Drop-in for ``open_clip.loss.CoCaLoss``: ``clip_loss_weight`` x the fused
    contrastive loss plus ``caption_loss_weight`` x the token cross-entropy of
    the captioner (``pad_id`` tokens ignored).

    ``forward(image_features, text_features, logits, labels, logit_scale,
    output_dict=False)`` with ``logits`` (batch, tokens, vocab) and ``labels``
    (batch, tokens) returns ``(contrastive_loss, caption_loss)`` or the dict
    with those keys. As in open_clip, ``clip_loss_weight=0`` skips the
    contrastive loss and returns a zero tensor for it, and the caption loss is
    this rank's own.
    """

    def __init__(
        self,
        caption_loss_weight,
        clip_loss_weight,
        pad_id: int = 0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        **kwargs,
    ):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod, **kwargs)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.pad_id = pad_id
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features, text_features, logits, labels, logit_scale,
                output_dict: bool = False):
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
            raise ValueError(
                f"logits must be a float tensor of shape (batch, tokens, vocab), got "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        if (not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]
                or labels.is_floating_point() or labels.dtype == torch.bool):
            raise ValueError(
                f"labels must be an integer tensor of shape (batch, tokens) = "
                f"{tuple(logits.shape[:2])} (the logits' first two dims), got "
                f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
                f"{' ' + str(labels.dtype) if isinstance(labels, torch.Tensor) else ''}")
        self._check_caption_labels(labels, logits.shape[2])
        if self.clip_loss_weight:
            clip = self.clip_loss_weight * self._contrastive(
                check_inputs(image_features, text_features, logit_scale))
        else:
            clip = torch.tensor(0, device=logits.device)
        caption = self.caption_loss(logits.permute(0, 2, 1), labels.long()) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip, "caption_loss": caption}
        return clip, caption

    def _check_caption_labels(self, labels: torch.Tensor, vocab: int) -> None:
        """A token id outside the vocabulary (other than pad_id, which the
        caption loss ignores) is a ValueError here, not an IndexError from
        inside cross_entropy. One host sync; skipped while torch.compile
        traces."""
        if torch.compiler.is_compiling() or labels.numel() == 0 or labels.device.type == "meta":
            return
        outside = (labels != self.pad_id) & ((labels < 0) | (labels >= vocab))
        if bool(outside.any()):
            where = outside.nonzero()[0].tolist()
            raise ValueError(
                f"labels must be token ids in [0, {vocab}) (the logits' vocab dim) or "
                f"pad_id={self.pad_id}; got {int(labels[tuple(where)])} at position "
                f"{tuple(where)} of labels with shape {tuple(labels.shape)}")

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", caption_loss_weight={self.caption_loss_weight}, "
                f"clip_loss_weight={self.clip_loss_weight}, pad_id={self.pad_id}")


class SigLipLoss(_ProcessGroupOwner, nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss`` backed by the fused kernels.

    The constructor takes open_clip's ``cache_labels, rank, world_size,
    dist_impl`` plus clipfast's keywords ``backend``, ``normalize`` (False by
    default, as open_clip), ``allow_tf32`` and ``group``. ``forward(
    image_features, text_features, logit_scale, logit_bias, output_dict=False)``
    returns ``-sum logsigmoid(z * L) / N`` over this rank's images against
    every rank's texts, or ``{"contrastive_loss": loss}``.

    With ``world_size > 1`` the other ranks' texts come to this rank by
    ``dist_impl``: "bidir" (default; neighbour exchanges in both directions,
    ceil((W-1)/2) hops), "shift" (one direction, W-1 hops), "reduce" (W
    all-reduces) or "gather" (one all-gather), each differentiable, as in
    open_clip. The blocks against other ranks have no positives. Only one
    rank's N x N block of logits ever exists at a time, and even that only as
    tiles in the fused backends.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: str = "auto",
                 normalize: bool = False, allow_tf32: Optional[bool] = None, group=None,
                 memory_budget: Optional[float] = None, check_ranks: bool = True):
        super().__init__()
        from .distributed import SIGLIP_DIST_IMPLS

        _check_module_options(rank, world_size, backend, normalize, allow_tf32)
        check_memory_budget(memory_budget)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.memory_budget = memory_budget
        self.backend = backend
        self.normalize = normalize
        self.allow_tf32 = allow_tf32
        self.group = group
        _check_flag("check_ranks", check_ranks)
        self.check_ranks = check_ranks
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits: int, negative_only: bool = False):
        """open_clip's labels: -1 everywhere, +1 on the diagonal unless
        ``negative_only`` (an N x N tensor; ``forward`` never builds it)."""
        return siglip_labels(num_logits, num_logits, not negative_only, dtype, device)

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """The N x N logits ``logit_scale * X @ Y.T + logit_bias`` (materialised:
        for inspection and for code built on open_clip's API)."""
        if self.normalize:
            image_features = F.normalize(image_features, dim=-1)
            text_features = F.normalize(text_features, dim=-1)
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        return logits

    def _loss(self, inputs: LossInputs, positives: bool = True):
        return siglip_loss_from_inputs(inputs, normalize=self.normalize, backend=self.backend,
                                       allow_tf32=self.allow_tf32, positives=positives,
                                       memory_budget=self.memory_budget)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict: bool = False):
        inputs = check_inputs(image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            from .distributed import check_process_group, siglip_distributed_loss

            check_process_group("SigLipLoss", self.rank, self.world_size, self._process_group())
            # Blocks against other ranks' texts: the same validated scalars,
            # texts of the shape and dtype every rank checked for its own.
            loss = siglip_distributed_loss(
                inputs, lambda x, y, positives: self._loss(
                    dataclasses.replace(inputs, image_features=x, text_features=y), positives),
                dist_impl=self.dist_impl, group=self._process_group(), check_ranks=self.check_ranks)
        else:
            loss = self._loss(inputs)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        text = (f"backend={self.backend!r}, normalize={self.normalize}, "
                f"allow_tf32={self.allow_tf32}")
        if self.world_size > 1:
            text += f", rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}"
        return text
