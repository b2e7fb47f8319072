"""open_clip's losses on clipfast's fused kernels, with one line before open_clip code::

    import clipfast.integrations.open_clip as clipfast_open_clip

    clipfast_open_clip.patch()             # or patch(backend="cpu", memory_budget=2**30)
    loss = open_clip.create_loss(args)     # now a clipfast drop-in, e.g. ClipLoss(backend='auto')

or, for open_clip's own training script, unchanged::

    python -m clipfast.integrations.open_clip [--clipfast-backend NAME]
        [--clipfast-memory-budget BYTES] <the arguments of python -m open_clip_train.main>

``patch()`` replaces open_clip's ``ClipLoss``, ``SigLipLoss``,
``DistillClipLoss`` and ``CoCaLoss`` by this module's classes of the same
names wherever open_clip and open_clip_train hold them: ``open_clip.loss.*``,
the re-exports (``open_clip.ClipLoss``) and the names ``open_clip.factory``
looks up inside ``create_loss``, so ``open_clip.create_loss(args)`` (and
``open_clip_train.main``'s copy of it) builds clipfast's losses. Any attribute
of a module ``open_clip``, ``open_clip.*``, ``open_clip_train`` or
``open_clip_train.*`` in ``sys.modules`` that *is* one of the four classes is
swapped, whatever its name; ``create_loss`` itself is left as it is.

The classes are subclasses of clipfast's modules (``isinstance(loss,
clipfast.ClipLoss)`` holds) with open_clip 3.x's constructor signatures,
defaults included, and clipfast's ``forward`` (open_clip's arguments and
outputs, ``output_dict=True`` with open_clip's keys), ``get_logits`` and
``get_ground_truth``. ``backend`` and ``memory_budget`` are those of the
latest ``patch()``, read when a loss is constructed: a loss keeps the backend
it was built with. They are defined here, at module level, so losses pickle and
``copy.deepcopy`` as usual.

``unpatch()`` puts open_clip's own classes back (the very objects; also where a
module imported while patched copied one of ours); ``patched()`` is the context
manager. Patching is process-wide and guarded by a lock; ``patch()`` again
re-binds the options and keeps the originals for ``unpatch()``.

Importing this module imports ``open_clip``; ``import clipfast`` and ``import
clipfast.integrations`` never do.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import types
from typing import Iterator, List, Optional, Sequence, Tuple

import open_clip  # noqa: F401 - the client this integration patches (see the docstring)
import open_clip.factory  # noqa: F401 - create_loss's globals, patched by name
import open_clip.loss as _open_clip_loss

from .. import modules as _modules
from .._inputs import check_memory_budget
from ..dispatch import BACKENDS

__all__ = ["ClipLoss", "CoCaLoss", "DistillClipLoss", "ORIGINALS", "SigLipLoss", "is_patched",
           "main", "patch", "patched", "unpatch"]

LOSS_NAMES = ("ClipLoss", "SigLipLoss", "DistillClipLoss", "CoCaLoss")

# open_clip's own classes, as open_clip.loss defines them (read-only).
ORIGINALS = types.MappingProxyType({name: getattr(_open_clip_loss, name) for name in LOSS_NAMES})

_LOCK = threading.RLock()
# (backend, memory_budget) for the losses built from now on; one tuple, so a
# constructor running in another thread reads a consistent pair.
_DEFAULT_BINDING: Tuple[str, Optional[float]] = ("auto", None)
_binding: Tuple[str, Optional[float]] = _DEFAULT_BINDING
# (module, attribute, original) for every attribute patch() replaced; None
# while unpatched.
_replaced: Optional[List[Tuple[types.ModuleType, str, type]]] = None


def _bound() -> dict:
    backend, memory_budget = _binding
    return {"backend": backend, "memory_budget": memory_budget}


# ------------------------------ the classes -------------------------------- #


class ClipLoss(_modules.ClipLoss):
    """``open_clip.loss.ClipLoss`` on clipfast's fused kernels.

    Args:
        local_loss: each rank's rows against every rank's columns (open_clip's).
        gather_with_grad: gather the other ranks' features with gradient.
        cache_labels: cache ``get_ground_truth``'s labels per device.
        rank: this process's rank.
        world_size: the number of ranks (torch.distributed when > 1).
        use_horovod: accepted as open_clip does; clipfast runs on
            torch.distributed and warns that the flag is ignored.

    ``backend`` and ``memory_budget`` are those bound by the latest
    ``patch()`` ("auto" and None when never patched). ``forward(
    image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` is ``clipfast.ClipLoss``'s.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                 world_size=1, use_horovod=False):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod, **_bound())


class DistillClipLoss(_modules.DistillClipLoss):
    """``open_clip.loss.DistillClipLoss`` on clipfast: the fused contrastive
    term plus open_clip's distillation term, computed in row chunks.

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size,
        use_horovod: as ``ClipLoss``'s (open_clip's).

    ``forward(image_features, text_features, logit_scale, dist_image_features,
    dist_text_features, dist_logit_scale, output_dict=False)`` returns
    ``(contrastive_loss, distill_loss)`` or the dict with those keys.
    ``backend`` and ``memory_budget`` come from ``patch()``.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                 world_size=1, use_horovod=False):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod, **_bound())


class CoCaLoss(_modules.CoCaLoss):
    """``open_clip.loss.CoCaLoss`` on clipfast: ``clip_loss_weight`` x the fused
    contrastive loss and ``caption_loss_weight`` x the captioner's token
    cross-entropy.

    Args:
        caption_loss_weight: the caption term's weight.
        clip_loss_weight: the contrastive term's weight (0 skips it, returning
            a zero tensor for it, as open_clip).
        pad_id: the token id the caption loss ignores (open_clip's tokenizer: 0).
        local_loss, gather_with_grad, cache_labels, rank, world_size,
        use_horovod: as ``ClipLoss``'s (open_clip's).

    ``forward(image_features, text_features, logits, labels, logit_scale,
    output_dict=False)`` returns ``(contrastive_loss, caption_loss)`` or the
    dict with those keys. ``backend`` and ``memory_budget`` come from ``patch()``.
    """

    def __init__(self, caption_loss_weight, clip_loss_weight, pad_id=0, local_loss=False,
                 gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False):
        super().__init__(caption_loss_weight, clip_loss_weight, pad_id=pad_id,
                         local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod, **_bound())


class SigLipLoss(_modules.SigLipLoss):
    """``open_clip.loss.SigLipLoss`` on clipfast's fused kernels.

    Args:
        cache_labels: kept as open_clip keeps it (neither uses it).
        rank: this process's rank.
        world_size: the number of ranks (torch.distributed when > 1).
        dist_impl: how the other ranks' texts come over: "bidir" (None),
            "shift", "reduce" or "gather", as open_clip.

    ``forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False)`` is ``clipfast.SigLipLoss``'s (``logit_bias`` may
    also be left out there). ``backend`` and ``memory_budget`` come from
    ``patch()``.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None):
        super().__init__(cache_labels=cache_labels, rank=rank, world_size=world_size,
                         dist_impl=dist_impl, **_bound())


PATCHED = types.MappingProxyType({"ClipLoss": ClipLoss, "SigLipLoss": SigLipLoss,
                                  "DistillClipLoss": DistillClipLoss, "CoCaLoss": CoCaLoss})


# ------------------------------ patching ----------------------------------- #


def _client_modules() -> List[types.ModuleType]:
    """open_clip's and open_clip_train's modules imported so far."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None:
            continue
        top = name.split(".", 1)[0]
        if top in ("open_clip", "open_clip_train"):
            found.append(module)
    return found


def _swap(mapping) -> List[Tuple[types.ModuleType, str, type]]:
    """Replace, in every client module, each attribute that is a key of
    ``mapping`` (by identity) with its value; return what was replaced."""
    by_id = {id(old): (old, new) for old, new in mapping}
    done = []
    for module in _client_modules():
        try:
            items = list(vars(module).items())
        except TypeError:  # a module object without a __dict__
            continue
        for attr, value in items:
            hit = by_id.get(id(value))
            if hit is not None and value is hit[0]:
                setattr(module, attr, hit[1])
                done.append((module, attr, value))
    return done


def _check_options(backend, memory_budget) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str (one of {BACKENDS}), got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_memory_budget(memory_budget)


def patch(backend: str = "auto", memory_budget: Optional[float] = None) -> None:
    """Make open_clip (and open_clip_train) build clipfast's losses.

    Args:
        backend: the clipfast backend the losses built from now on use (one
            of ``clipfast.BACKENDS``; "auto" picks per call).
        memory_budget: bytes the forward may keep for the backward (None:
            none; ``clipfast.clip_loss``'s option).

    Swaps the four classes wherever open_clip's modules hold them (see the
    module docstring). Calling it again is allowed: it re-binds ``backend``
    and ``memory_budget`` for losses built afterwards, patches modules
    imported since, and ``unpatch()`` still restores open_clip's originals.

    Raises:
        TypeError / ValueError: a bad ``backend`` or ``memory_budget``
            (nothing is patched then).
    """
    global _binding, _replaced
    _check_options(backend, memory_budget)
    with _LOCK:
        _binding = (backend, memory_budget)
        swapped = _swap((ORIGINALS[name], PATCHED[name]) for name in LOSS_NAMES)
        _replaced = (_replaced or []) + swapped


def unpatch() -> None:
    """Put open_clip's own loss classes back where ``patch()`` put clipfast's.

    Every attribute ``patch()`` replaced gets its original object back (unless
    something else was assigned to it since), and so does any attribute of an
    open_clip / open_clip_train module that still holds one of this module's
    classes (a module imported while patched). The binding returns to
    ``backend="auto"``, ``memory_budget=None``. A no-op when not patched;
    losses already built stay what they are.
    """
    global _binding, _replaced
    with _LOCK:
        for module, attr, original in reversed(_replaced or []):
            current = getattr(module, attr, None)
            if any(current is cls for cls in PATCHED.values()):
                setattr(module, attr, original)
        _swap((PATCHED[name], ORIGINALS[name]) for name in LOSS_NAMES)
        _replaced = None
        _binding = _DEFAULT_BINDING


def is_patched() -> bool:
    """Whether ``patch()`` is in force (and ``unpatch()`` not called since)."""
    with _LOCK:
        return _replaced is not None


@contextlib.contextmanager
def patched(backend: str = "auto", memory_budget: Optional[float] = None) -> Iterator[None]:
    """``patch(backend, memory_budget)`` for the ``with`` block.

    Args:
        backend: as ``patch``'s.
        memory_budget: as ``patch``'s.

    On leaving (an exception included) the state before the block comes back:
    unpatched, or patched with the options bound then (blocks nest). The
    patch is process-wide: blocks that overlap in different threads restore
    in the order they exit, so threaded code should rather ``patch()`` once.
    """
    with _LOCK:
        was_patched, previous = _replaced is not None, _binding
        patch(backend, memory_budget)
    try:
        yield
    finally:
        with _LOCK:
            if was_patched:
                patch(*previous)
            else:
                unpatch()


# ------------------------------ the runner --------------------------------- #


def main(argv: Optional[Sequence[str]] = None):
    """``python -m clipfast.integrations.open_clip``: open_clip_train's
    training script (``open_clip_train.main.main``) with the losses patched.

    Args:
        argv: the command line without the program name (default
            ``sys.argv[1:]``): ``--clipfast-backend NAME`` (default "auto") and
            ``--clipfast-memory-budget BYTES`` (default none), anywhere, and
            everything else for ``open_clip_train.main`` unchanged.

    Returns open_clip_train's ``main``'s result; the patch is undone after it.
    open_clip_train's data loading needs open_clip_torch's ``[training]``
    extra (webdataset, braceexpand, pandas, ...).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--clipfast-backend", default="auto", choices=BACKENDS)
    parser.add_argument("--clipfast-memory-budget", type=float, default=None)
    ours, rest = parser.parse_known_args(args)
    _check_options(ours.clipfast_backend, ours.clipfast_memory_budget)
    from open_clip_train.main import main as train_main

    with patched(ours.clipfast_backend, ours.clipfast_memory_budget):
        return train_main(rest)


if __name__ == "__main__":
    # Run the importable copy of this module (clipfast.integrations.open_clip),
    # not __main__'s, so that the patched classes are the canonical ones.
    from clipfast.integrations.open_clip import main as _main

    _main()
