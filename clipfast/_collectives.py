"""The collectives every distributed path shares: the batch-size agreement
check and the all-gather whose backward returns each rank its gradient.

Below both ``clipfast.distributed`` (the CLIP/SigLIP modes) and
``clipfast.infonce`` (``gather_across_devices``), so neither imports the other.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import torch
import torch.distributed as dist


def world(group=None) -> Tuple[int, int]:
    """(rank, world_size) in ``group``, (0, 1) when torch.distributed is not
    initialised (a single process: gathering is the identity)."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# dtypes by a small code, so that one int64 all_gather carries them.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else "other"


def check_rank_agreement(what: str, image_features: torch.Tensor, text_features: torch.Tensor,
                         group=None, **counts: int) -> None:
    """Raise the same ValueError on every rank when the ranks disagree on
    what their collectives assume: the local batch size, the embedding dim,
    the two feature dtypes and the named ``counts`` (e.g. negatives per rank,
    whether logit_scale needs a gradient).

    One all_gather of a few int64s before the first collective: every rank
    sees every rank's values and raises the same error, naming the field and
    each rank's value, instead of one rank aborting inside a collective of
    mismatched sizes and the other losing its connection.
    """
    fields = {
        "local batch size": image_features.shape[0],
        "embedding dim d of image/query features": image_features.shape[1],
        "embedding dim d of text/key features": text_features.shape[1],
        "dtype of image/query features": _dtype_code(image_features.dtype),
        "dtype of text/key features": _dtype_code(text_features.dtype),
        **counts,
    }
    world_size = dist.get_world_size(group)
    mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=image_features.device)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu().tolist()
    problems = []
    for column, name in enumerate(fields):
        values = [row[column] for row in table]
        if len(set(values)) == 1:
            continue
        shown = [_dtype_name(v) for v in values] if name.startswith("dtype") else values
        problems.append(f"{name}: {shown}")
    if problems:
        hint = ("; pad or drop the last partial batch" if problems[0].startswith("local batch")
                else "")
        raise ValueError(
            f"{what} needs the same local batch size (and dims, dtypes) on every rank; the ranks "
            f"disagree on " + "; ".join(problems) + " (listed by rank)" + hint)


def gather_with_grad(features: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' ``features`` concatenated in rank order. The backward sums
    every rank's gradient for a slot into its owner (PyTorch's autograd-aware
    all_gather), as open_clip's ``gather_with_grad`` and sentence-transformers'
    ``all_gather_with_grad`` do."""
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of a private API; still the public autograd gather.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(features.contiguous(), group=group or dist.group.WORLD))


def gather_no_grad(values: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' ``values`` concatenated in rank order, without gradient."""
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, values.contiguous(), group=group)
    return torch.cat(parts)
