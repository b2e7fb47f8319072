"""What a backend is: the declaration each backend module makes once.

A backend is one way of computing the losses. Its module (or folder) under
``clipfast/backends/`` holds the computation and one ``Backend`` instance that
tells the registry (``clipfast.backends``)

* its name and a one-line summary;
* what it can run: the feature dtypes it computes in, the devices it accepts
  (``device_problem``), the losses it has (``losses``), and whether ``auto``
  may pick it on a device (``native``);
* why not, when it cannot: ``problem(inputs)`` returns the exception a user
  sees for naming it with inputs it cannot run;
* its entry points: the CLIP and SigLIP operators (torch.library custom ops
  with autograd, see ``clipfast.backends._ops``), the one-direction row loss
  and the block primitives the distributed modes build on.

Entry points are methods that import their implementation when called, so
that importing the registry imports neither triton nor a compiled extension
(and so that torch.compile traces them as plain import statements).
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple

import torch

from .._inputs import LossInputs

# What a backend may have, beyond the symmetric CLIP loss every backend has.
SIGLIP = "siglip"  # siglip_loss and SigLipLoss
ROWS = "rows"  # one direction over a rectangular block, with extra per-row logits:
#                hard negatives, asymmetric InfoNCE, ClipLoss(local_loss=True)
BLOCKS = "blocks"  # the ring mode's block statistics / gradients (ClipLoss(ring=True))

LOSS_DESCRIPTIONS = {
    SIGLIP: "SigLIP loss",
    ROWS: "one-direction / hard-negative loss",
    BLOCKS: "block primitives for the ring mode",
}

HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    """"float16, bfloat16 and float32"."""
    names = [str(dt).replace("torch.", "") for dt in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class Backend:
    """The declaration of one backend (one instance per backend module)."""

    name: str = ""
    summary: str = ""
    # Feature dtypes it computes in; others get a TypeError naming them.
    dtypes: Tuple[torch.dtype, ...] = HALF_AND_SINGLE
    dtype_hint: str = ""  # appended to that TypeError: what to use instead
    losses: FrozenSet[str] = frozenset({SIGLIP})
    # The argument that sizes its working set (clip_loss's chunk_elements or
    # panel_size), passed to its operators as ``block``; None: it takes none.
    block_option: Optional[str] = None
    # The backend whose primitives serve the losses this one lacks, when auto
    # picked it or a distributed mode needs block primitives (if that backend
    # can run the inputs; chunked otherwise).
    stand_in: str = "chunked"
    # Whether its operators honour memory_budget (keep logits for the backward).
    keeps_logits: bool = False

    # ------------------------------ capability ----------------------------- #

    def device_problem(self, device: torch.device) -> Optional[Exception]:
        """Why features on ``device`` cannot run here (None: they can).
        Never called for meta tensors, which every backend accepts."""
        return None

    def problem(self, inputs: LossInputs) -> Optional[Exception]:
        """The exception for running ``inputs`` on this backend, or None."""
        device = inputs.image_features.device
        # Meta tensors only propagate shapes (the operators' fake
        # implementations): any backend accepts them, whatever it computes on.
        if device.type != "meta":
            err = self.device_problem(device)
            if err is not None:
                return err
        dtypes = (inputs.image_features.dtype, inputs.text_features.dtype)
        if any(dt not in self.dtypes for dt in dtypes):
            return TypeError(
                f"backend={self.name!r} supports {dtype_names(self.dtypes)} features, got "
                f"{inputs.names[0]} {dtypes[0]} and {inputs.names[1]} {dtypes[1]}{self.dtype_hint}")
        return None

    def native(self, device: torch.device, dtypes: Sequence[torch.dtype]) -> bool:
        """Whether ``auto`` may pick it for features of these dtypes on this
        device: it runs there for real (no interpreter, no emulation), is
        installed, and computes in these dtypes."""
        return False

    def has(self, loss: str) -> bool:
        return loss in self.losses

    # ------------------------------ entry points --------------------------- #

    def clip_op(self) -> Callable:
        """``op(x, y, scale, bias, normalize, allow_tf32, block) -> loss``."""
        raise NotImplementedError(f"backend={self.name!r} has no fused CLIP operator")

    def siglip_ops(self) -> Dict[bool, Callable]:
        """{positives: op} with the CLIP operator's signature."""
        raise NotImplementedError(f"backend={self.name!r} has no SigLIP operator")

    def row_loss(self, normalize: bool, allow_tf32: bool, block: int,
                 memory_budget: float = 0.0) -> Callable:
        """``row(queries, keys, scale, bias, label_offset, extra_logits) ->
        mean_i CE(row i, label i + label_offset)`` (see ``ROWS``);
        ``memory_budget`` as the operators' (ignored where they ignore it)."""
        raise NotImplementedError(f"backend={self.name!r} has no row loss")

    def block_ops(self):
        """The class of the ring mode's block primitives (see ``BLOCKS``)."""
        raise NotImplementedError(f"backend={self.name!r} has no block primitives")

    def block(self, chunk_elements: Optional[int], panel_size: Optional[int]) -> int:
        """The operators' ``block`` argument from clip_loss's size arguments:
        the one this backend takes, 0 (its default) when not given."""
        value = {"chunk_elements": chunk_elements, "panel_size": panel_size}.get(
            self.block_option or "")
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.block_option} must be a positive int, got {value!r}")
        return value


# ------------------------- compiled extensions ------------------------------ #


def load_extension(module: str, backend: str, hint: str):
    """Import ``clipfast.<module>`` or raise an ImportError naming the backend and
    how to build the extension."""
    try:
        return importlib.import_module(f"clipfast.{module}")
    except ImportError as err:
        raise ImportError(f"backend={backend!r}: {hint} ({err})") from err


def extension_available(load) -> bool:
    """Whether ``load()`` (a backend's ``extension``) imports its compiled module."""
    try:
        load()
    except ImportError:
        return False
    return True


def extension_problem(load, *args) -> Optional[ImportError]:
    """The ImportError ``load(*args)`` raises (with the build instructions),
    or None. Not tried while torch.compile traces (it cannot trace imports
    through importlib); the operator then raises the same error when it runs."""
    if torch.compiler.is_compiling():
        return None
    try:
        load(*args)
    except ImportError as err:
        return err
    return None
