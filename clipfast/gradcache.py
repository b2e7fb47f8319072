"""Encoder chunking (gradient caching) for contrastive training steps.

The loss needs every feature of the batch at once, but the encoders' activations
need not be alive together. ``cached_contrastive_backward`` runs the encoders
over the batch in chunks without autograd, computes the loss and the gradients
of the features on the whole batch (with clipfast, so the N x N logits never
exist either), then re-runs each chunk with autograd and backpropagates the
cached feature gradients into it. The parameters' gradients equal those of the
unchunked step; peak activation memory is one chunk's.

Random operations (dropout) replay identically in the second pass: each
chunk's RNG state is recorded before its first pass and restored for its
second.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence, Union

import torch

Batch = Union[torch.Tensor, Sequence[torch.Tensor]]


def _slice(batch: Batch, start: int, stop: int):
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    return type(batch)(t[start:stop] for t in batch)


def _length(batch: Batch) -> int:
    return batch.shape[0] if isinstance(batch, torch.Tensor) else batch[0].shape[0]


class _RngState:
    """The CPU generator's state and that of every CUDA device in use."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextmanager
    def replay(self):
        cuda_devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def cached_contrastive_backward(
    encode_image: Callable[[Batch], torch.Tensor],
    encode_text: Callable[[Batch], torch.Tensor],
    images: Batch,
    texts: Batch,
    loss_fn: Callable[..., torch.Tensor],
    logit_scale: torch.Tensor,
    chunk_size: int,
    logit_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One training step's loss and backward with the encoders run in chunks.

    Args:
        encode_image, encode_text: map a slice of the batch (rows of a tensor,
            or of each tensor in a tuple) to (rows, d) features.
        images, texts: the whole batch (N rows each).
        loss_fn: called as ``loss_fn(image_features, text_features,
            logit_scale, logit_bias=...)``, e.g. ``clipfast.ClipLoss()``.
        logit_scale, logit_bias: tensors in the autograd graph of their
            parameters (e.g. ``model.logit_scale.exp()``).
        chunk_size: rows per encoder pass.

    Returns the detached loss; the parameters' ``.grad`` hold the step's
    gradients, as after ``loss.backward()`` on the unchunked step.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = _length(images)
    if _length(texts) != n:
        raise ValueError(f"images have {n} rows but texts have {_length(texts)}")
    bounds = [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]

    def first_pass(encode, batch):
        states: List[_RngState] = []
        parts = []
        with torch.no_grad():
            for start, stop in bounds:
                states.append(_RngState())
                parts.append(encode(_slice(batch, start, stop)))
        return torch.cat(parts).requires_grad_(), states

    image_features, image_states = first_pass(encode_image, images)
    text_features, text_states = first_pass(encode_text, texts)

    loss = loss_fn(image_features, text_features, logit_scale, logit_bias=logit_bias)
    # The scale and bias gradients flow into their parameters here; the feature
    # gradients stop at the detached leaves and are replayed below.
    loss.backward()

    for encode, batch, features, states in (
            (encode_image, images, image_features, image_states),
            (encode_text, texts, text_features, text_states)):
        for (start, stop), state in zip(bounds, states):
            with state.replay():
                chunk = encode(_slice(batch, start, stop))
            chunk.backward(features.grad[start:stop])
    return loss.detach()
