"""Hugging Face ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` losses in O(N) memory.

``model(**batch, return_loss=True).loss`` in transformers builds the (N, N)
logits of the batch and takes the contrastive loss on them. This module
computes the same loss, in value and in every parameter's gradient, from the
model's own (N, d) embeddings with clipfast's kernels, which never build it::

    from clipfast.integrations.transformers import model_loss, patch

    loss = model_loss(model, **batch)      # == model(**batch, return_loss=True).loss
    patch(model)                           # model(..., return_loss=True) now does the same
    trainer = transformers.Trainer(model=model, ...)   # batches carry return_loss=True

What runs is what the model's ``forward`` runs (read against transformers
5.25), up to the logits:

* ``CLIPModel``: ``get_image_features`` / ``get_text_features`` (the towers
  and their projections), then ``clipfast.clip_loss(image, text,
  logit_scale.exp(), normalize=True)``: the mean of the image -> text and
  text -> image cross-entropies, HF's ``(CE(logits_per_text) +
  CE(logits_per_image)) / 2``. transformers does not clamp ``logit_scale`` in
  the forward, and neither does this;
* ``SiglipModel`` / ``Siglip2Model``: the ``vision_model`` / ``text_model``
  towers' pooled outputs, then ``clipfast.siglip_loss(image, text,
  logit_scale.exp(), logit_bias, normalize=True)``: ``-sum_ij
  logsigmoid(z_ij L_ij) / N`` with z = +1 on the diagonal and -1 elsewhere,
  HF's sum over each row's columns and mean over rows.

The features are L2-normalised inside the kernels (eps 1e-12, as
``F.normalize``; HF divides by the norm itself: the same for any nonzero
embedding). Like HF, the image embeddings and the scales are moved to the
text embeddings' device. The loss is a 0-dim tensor in the embeddings' dtype,
float32 for float16 / bfloat16 embeddings (clipfast's convention, and what
HF's loss is under autocast).

Subclasses of the three classes are accepted (they run their own
``get_*_features`` / towers); ``Siglip2Model`` where the installed
transformers has it. ``SUPPORTED_MODELS`` names them.

Importing this module imports ``transformers`` (the top-level package, whose
model classes load lazily); ``import clipfast`` and ``import
clipfast.integrations`` never do.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import transformers  # noqa: F401 - the client this integration serves (see the docstring)

from .._inputs import check_memory_budget
from ..api import clip_loss, siglip_loss
from ..dispatch import BACKENDS

__all__ = ["SUPPORTED_MODELS", "is_patched", "model_loss", "patch", "patched", "unpatch"]


@dataclass(frozen=True)
class _Kind:
    """How one supported class's ``forward`` gets its embeddings and loss."""

    name: str                      # the transformers class, e.g. "CLIPModel"
    module: str                    # the module defining it and its output class
    output: str                    # the output class's name
    siglip: bool                   # sigmoid loss (else CLIP's softmax loss)
    vision_args: Tuple[str, ...]   # forward's arguments that go to the vision side only
    required: Tuple[str, ...]      # the inputs the loss cannot do without

    text_args: Tuple[str, ...] = ("input_ids", "attention_mask", "position_ids")

    def output_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.output)


_KINDS = (
    _Kind("CLIPModel", "transformers.models.clip.modeling_clip", "CLIPOutput", False,
          ("pixel_values", "interpolate_pos_encoding"), ("input_ids", "pixel_values")),
    _Kind("SiglipModel", "transformers.models.siglip.modeling_siglip", "SiglipOutput", True,
          ("pixel_values", "interpolate_pos_encoding"), ("input_ids", "pixel_values")),
    _Kind("Siglip2Model", "transformers.models.siglip2.modeling_siglip2", "Siglip2Output", True,
          ("pixel_values", "pixel_attention_mask", "spatial_shapes"),
          ("input_ids", "pixel_values", "spatial_shapes")),
)

#: The transformers classes ``model_loss`` and ``patch`` take (and their subclasses).
SUPPORTED_MODELS = tuple(kind.name for kind in _KINDS)

_PATCH_ATTR = "_clipfast_patch"
# Arguments of forward that select its output rather than feed the towers.
_CONTROL_ARGS = ("return_loss", "return_dict")


def _kind_of(model: Any, caller: str) -> _Kind:
    """The supported class ``model`` is (an instance of a subclass counts), or a TypeError.

    The classes are recognised by module and name along the MRO, so checking
    a model does not import every supported modeling module."""
    for cls in type(model).__mro__:
        for kind in _KINDS:
            if cls.__name__ == kind.name and cls.__module__ == kind.module:
                return kind
    raise TypeError(
        f"{caller}: model must be a transformers {', '.join(SUPPORTED_MODELS[:-1])} or "
        f"{SUPPORTED_MODELS[-1]} (or a subclass), got {type(model).__module__}."
        f"{type(model).__qualname__}")


def _check_options(backend: str, memory_budget: Optional[float], caller: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{caller}: backend must be one of {BACKENDS}, got {backend!r}")
    check_memory_budget(memory_budget)


def _towers(model: Any, kind: _Kind, inputs: Dict[str, Any], caller: str):
    """(vision output, text output) as the model's forward computes them.

    ``inputs`` holds forward's arguments by name (the control arguments
    removed); what is neither a vision nor a text argument goes to both
    towers, as forward's ``**kwargs`` do."""
    for name in kind.required:
        if inputs.get(name) is None:
            raise ValueError(
                f"{caller}: {kind.name}'s contrastive loss needs {name!r} in the batch "
                f"(it needs {', '.join(map(repr, kind.required))}); got "
                f"{sorted(k for k, v in inputs.items() if v is not None)}")
    vision = {k: inputs[k] for k in kind.vision_args if k in inputs}
    text = {k: inputs[k] for k in kind.text_args if k in inputs}
    shared = {k: v for k, v in inputs.items() if k not in vision and k not in text}
    if kind.siglip:
        # SigLIP's forward calls the towers directly; their pooled outputs are the embeddings.
        vision_out = model.vision_model(**vision, **shared, return_dict=True)
        text_out = model.text_model(**text, **shared, return_dict=True)
    else:
        # CLIP's forward goes through get_*_features, which project the pooled outputs.
        vision_out = model.get_image_features(**vision, **shared, return_dict=True)
        text_out = model.get_text_features(**text, **shared, return_dict=True)
    return vision_out, text_out


def _loss(model: Any, kind: _Kind, image: torch.Tensor, text: torch.Tensor, backend: str,
          memory_budget: Optional[float]) -> torch.Tensor:
    """The contrastive loss of the raw (unnormalised) embeddings, never N x N."""
    device = text.device
    image = image.to(device)
    scale = model.logit_scale.to(device).exp()
    if kind.siglip:
        return siglip_loss(image, text, scale, model.logit_bias.to(device), normalize=True,
                           backend=backend, memory_budget=memory_budget)
    return clip_loss(image, text, scale, normalize=True, backend=backend,
                     memory_budget=memory_budget)


def model_loss(model: Any, *, backend: str = "auto", memory_budget: Optional[float] = None,
               **batch: Any) -> torch.Tensor:
    """``model(**batch, return_loss=True).loss`` without the (N, N) logits.

    The towers run exactly as in the model's forward; the loss is then
    computed from the (N, d) embeddings by ``clipfast.clip_loss`` (CLIPModel)
    or ``clipfast.siglip_loss`` (SiglipModel, Siglip2Model) with the features
    normalised inside the kernel. Value and gradients (towers, projections,
    ``logit_scale`` and SigLIP's ``logit_bias``) equal transformers' to
    rounding.

    Args:
        model: a transformers ``CLIPModel``, ``SiglipModel`` or
            ``Siglip2Model`` (or a subclass); anything else is a TypeError.
        backend: clipfast's backend for the loss ("auto", "reference",
            "chunked", "triton", "hybrid", "cpu", "cuda"), as ``clip_loss``'s.
        memory_budget: bytes the loss may keep for its backward (see
            ``clipfast.clip_loss``; None keeps nothing).
        **batch: what the model's forward takes: ``input_ids`` and
            ``pixel_values`` (required), ``attention_mask``, ``position_ids``,
            ``interpolate_pos_encoding`` (CLIP, SigLIP), ``pixel_attention_mask``
            and ``spatial_shapes`` (Siglip2; ``spatial_shapes`` is required),
            and any further keyword the towers take (``output_attentions``,
            ...). ``return_loss`` and ``return_dict`` are accepted and ignored,
            so a collator's batch for ``Trainer`` can be passed as it is.

    Returns:
        The 0-dim loss: the embeddings' dtype (float32 for float16/bfloat16).

    Raises:
        TypeError: ``model`` is not one of the supported classes.
        ValueError: an input the loss needs is missing, or a bad ``backend``
            / ``memory_budget``.
    """
    kind = _kind_of(model, "model_loss")
    _check_options(backend, memory_budget, "model_loss")
    inputs = {k: v for k, v in batch.items() if k not in _CONTROL_ARGS}
    vision_out, text_out = _towers(model, kind, inputs, "model_loss")
    return _loss(model, kind, vision_out.pooler_output, text_out.pooler_output, backend,
                 memory_budget)


# ------------------------------- patching ---------------------------------- #


@dataclass
class _PatchState:
    """Kept on the patched instance (so ``copy.deepcopy`` and pickle carry it along)."""

    backend: str
    memory_budget: Optional[float]
    had_forward: bool           # whether the instance had its own ``forward`` before
    previous: Any               # that instance attribute (e.g. accelerate's wrapper), else None


def _patched_output(model: Any, kind: _Kind, state: _PatchState, inputs: Dict[str, Any],
                    return_dict: Optional[bool]):
    vision_out, text_out = _towers(model, kind, inputs, f"{kind.name}.forward(return_loss=True)")
    image_raw, text_raw = vision_out.pooler_output, text_out.pooler_output
    loss = _loss(model, kind, image_raw, text_raw, state.backend, state.memory_budget)
    output = kind.output_class()(
        loss=loss,
        logits_per_image=None,
        logits_per_text=None,
        text_embeds=text_raw / text_raw.norm(p=2, dim=-1, keepdim=True),
        image_embeds=image_raw / image_raw.norm(p=2, dim=-1, keepdim=True),
        text_model_output=text_out,
        vision_model_output=vision_out,
    )
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return output if return_dict else output.to_tuple()


class _PatchedForward:
    """``model.forward`` while ``patch`` is in effect.

    A callable object rather than a bound function so that it pickles and
    deep-copies with its model: both rebuild it from ``(model,)``, and the
    copy's forward runs the copy. ``__wrapped__`` is the class's forward bound
    to the model, so ``inspect.signature`` (Trainer's column and loss-kwargs
    checks) sees the model's own arguments."""

    __name__ = "forward"

    def __init__(self, model: Any):
        self.model = model

    @property
    def __wrapped__(self) -> Callable:
        return type(self.model).forward.__get__(self.model, type(self.model))

    def __reduce__(self):
        return (_PatchedForward, (self.model,))

    def __repr__(self) -> str:
        return f"<clipfast-patched forward of {type(self.model).__name__} at {id(self.model):#x}>"

    def __call__(self, *args: Any, **kwargs: Any):
        model = self.model
        state: _PatchState = model.__dict__[_PATCH_ATTR]
        original = type(model).forward
        signature = inspect.signature(original)
        bound = signature.bind(model, *args, **kwargs)
        named: Dict[str, Any] = {}
        for i, (name, value) in enumerate(bound.arguments.items()):
            kind = signature.parameters[name].kind
            if i == 0:
                continue  # self
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{type(model).__name__}.forward: unexpected positional "
                                    f"arguments {value!r}")
            else:
                named[name] = value
        if not named.get("return_loss"):
            # No loss asked for: the model's own forward, logits and all.
            if state.had_forward:
                return state.previous(*args, **kwargs)
            return original(model, *args, **kwargs)
        return_dict = named.get("return_dict")
        inputs = {k: v for k, v in named.items() if k not in _CONTROL_ARGS}
        return _patched_output(model, _kind_of(model, "patch"), state, inputs, return_dict)


def is_patched(model: Any) -> bool:
    """Whether ``patch`` is in effect on ``model`` (this instance)."""
    attrs = getattr(model, "__dict__", {})
    current = attrs.get("forward")
    return (_PATCH_ATTR in attrs and isinstance(current, _PatchedForward)
            and current.model is model)


def patch(model: Any, *, backend: str = "auto", memory_budget: Optional[float] = None) -> Any:
    """Make ``model(..., return_loss=True)`` compute its loss with clipfast.

    Per instance: the model's ``forward`` attribute is replaced by one that,
    when ``return_loss`` is true, runs the towers as the original does and
    returns the model's own output class (``CLIPOutput``, ``SiglipOutput``,
    ``Siglip2Output``) with

    * ``loss``: ``model_loss(model, **batch)`` (equal to the original's in value
      and gradients, computed without the N x N logits);
    * ``logits_per_image`` / ``logits_per_text``: None. Holding them is what
      this avoids (they are N x N, and the gradient of the loss does not need
      them); a caller that wants the logits gets them from the unchanged
      ``return_loss=False`` path, or as ``logit_scale.exp() * text_embeds @
      image_embeds.T`` (+ ``logit_bias`` for SigLIP). In the tuple form
      (``return_dict=False``) the None fields are left out, as transformers'
      ``to_tuple`` does, so the embeddings follow the loss directly;
    * ``text_embeds`` / ``image_embeds`` (normalised), ``text_model_output``
      / ``vision_model_output``: as the original's.

    With ``return_loss`` false or absent the original forward runs, unchanged.
    The patched forward has the original's signature, so ``Trainer`` sees the
    same columns; feed it batches with ``return_loss=True`` (as
    transformers' contrastive training examples do).

    Patching a patched model updates ``backend`` / ``memory_budget`` (it does
    not stack). ``copy.deepcopy(model)`` (and pickling: ``torch.save`` of the
    whole module) gives a patched copy whose forward runs the copy's weights;
    ``unpatch`` either independently. A forward that the instance already had
    (a wrapper set by accelerate, say) is what the ``return_loss=False`` path
    calls and what ``unpatch`` puts back; the loss path does not go through
    it, so patch before wrapping (``Trainer`` wraps the model it is given
    later, on top of the patch).

    Args:
        model: a transformers ``CLIPModel``, ``SiglipModel`` or
            ``Siglip2Model`` (or a subclass).
        backend: clipfast's backend for the loss, as ``model_loss``'s.
        memory_budget: as ``model_loss``'s.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not one of the supported classes.
        ValueError: a bad ``backend`` / ``memory_budget``.
    """
    _kind_of(model, "patch")
    _check_options(backend, memory_budget, "patch")
    if is_patched(model):
        state = model.__dict__[_PATCH_ATTR]
        state.backend, state.memory_budget = backend, memory_budget
        return model
    had_forward = "forward" in model.__dict__
    state = _PatchState(backend, memory_budget, had_forward,
                        model.__dict__["forward"] if had_forward else None)
    # object.__setattr__: plain instance attributes, whatever nn.Module's
    # __setattr__ would make of them.
    object.__setattr__(model, _PATCH_ATTR, state)
    object.__setattr__(model, "forward", _PatchedForward(model))
    return model


def unpatch(model: Any) -> Any:
    """Undo ``patch``: the instance's ``forward`` is again what it was before
    (the class's, or the instance attribute it had then), and nothing of the
    patch is left on the model. A model that is not patched is returned as it is.

    Args:
        model: a model ``patch`` was applied to (or any supported model).

    Returns:
        ``model`` itself.

    Raises:
        RuntimeError: ``model.forward`` was replaced after ``patch`` (undoing
            the patch would drop that replacement); restore it first.
    """
    state = getattr(model, "__dict__", {}).get(_PATCH_ATTR)
    if state is None:
        return model
    if not is_patched(model):
        raise RuntimeError(
            "unpatch: model.forward was replaced after clipfast's patch(); restore that "
            "forward first (undoing the patch now would drop the replacement)")
    del model.__dict__["forward"]
    del model.__dict__[_PATCH_ATTR]
    if state.had_forward:
        object.__setattr__(model, "forward", state.previous)
    return model


@contextlib.contextmanager
def patched(model: Any, *, backend: str = "auto",
            memory_budget: Optional[float] = None) -> Iterator[Any]:
    """``patch(model, ...)`` for the ``with`` block, ``unpatch(model)`` after
    (also when the block raises). Arguments as ``patch``'s; yields ``model``."""
    was_patched = is_patched(model)
    previous = None
    if was_patched:
        state = model.__dict__[_PATCH_ATTR]
        previous = (state.backend, state.memory_budget)
    patch(model, backend=backend, memory_budget=memory_budget)
    try:
        yield model
    finally:
        if was_patched:
            patch(model, backend=previous[0], memory_budget=previous[1])
        else:
            unpatch(model)
