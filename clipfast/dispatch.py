"""Which backend runs a call: the registry's answer for a named backend, or
``auto``'s choice, and the stand-in for a loss a backend does not have.

Every public entry point validates its inputs once (``clipfast._inputs``)
and asks ``resolve_backend`` here; the backend it names then computes.
"""

from __future__ import annotations

import torch

from ._inputs import LossInputs
from .backends import BLOCKS, LOSS_DESCRIPTIONS, REGISTRY, Backend, get, with_loss

CLIP = "clip"  # the symmetric CLIP loss: every backend has it

BACKENDS = ("auto",) + tuple(REGISTRY)


def resolve_backend(backend: str, inputs: LossInputs, loss: str = CLIP) -> str:
    """The backend that computes ``loss`` for ``inputs`` when the caller asks
    for ``backend`` (a name in ``BACKENDS``).

    A named backend must be able to run the inputs and have the loss, else
    the error says why (the backend's own message, or which backends have the
    loss). ``auto`` takes the fastest measured backend (``clipfast.autoselect``)
    and, when that one lacks the loss, its stand-in.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _stand_in_for(_auto_choice(inputs), inputs, loss)
    err = get(backend).problem(inputs)
    if err is not None:
        raise err
    if loss != CLIP and not get(backend).has(loss):
        raise ValueError(
            f"backend={backend!r} has no {LOSS_DESCRIPTIONS[loss]} yet; the backends with it "
            f"are {', '.join(with_loss(loss))} (and 'auto')")
    return backend


def resolve(backend: str, inputs: LossInputs, loss: str = CLIP) -> Backend:
    """``resolve_backend``'s answer as the registry's ``Backend``."""
    return get(resolve_backend(backend, inputs, loss))


def block_backend(backend: str, inputs: LossInputs) -> Backend:
    """The backend whose block primitives serve the distributed ring and
    local_loss modes when the caller asks for ``backend``: that backend when it
    has them, else its stand-in (a fused GPU backend borrows triton's where
    Triton runs; everything else chunked's)."""
    return get(_stand_in_for(resolve_backend(backend, inputs), inputs, BLOCKS))


def _stand_in_for(chosen: str, inputs: LossInputs, loss: str) -> str:
    if loss == CLIP or get(chosen).has(loss):
        return chosen
    stand_in = get(get(chosen).stand_in)
    if stand_in.has(loss) and stand_in.problem(inputs) is None:
        return stand_in.name
    return "chunked"


def _auto_choice(inputs: LossInputs) -> str:
    x, y = inputs.image_features, inputs.text_features
    if torch.compiler.is_compiling():
        n, d = x.shape
        return _auto_choice_constant(x.device.type, x.device.index, x.dtype, y.dtype, int(n),
                                     int(d))
    from .autoselect import choose

    return choose(x, y)


@torch.compiler.assume_constant_result
def _auto_choice_constant(device_type: str, device_index, image_dtype, text_dtype, n: int,
                          d: int) -> str:
    """``auto``'s choice while torch.compile traces: the same table lookup,
    evaluated once at trace time and baked into the graph (int(N) specialises
    the graph on the batch size, so a new batch size retraces and re-chooses)."""
    from .autoselect import explain

    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    return explain(device, (image_dtype, text_dtype), n, d).backend
