"""The collectives every distributed path shares: the batch-size agreement
check and the all-gather whose backward returns each rank its gradient.

Below both ``clipfast.distributed`` (the CLIP/SigLIP modes) and
``clipfast.infonce`` (``gather_across_devices``), so neither imports the other.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


def world(group=None) -> Tuple[int, int]:
    """(rank, world_size) in ``group``, (0, 1) when torch.distributed is not
    initialised (a single process: gathering is the identity)."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_equal_batches(local_n: int, device: torch.device, group=None,
                        what: str = "distributed ClipLoss", extra: Optional[List[int]] = None) -> None:
    """Raise the same ValueError on every rank when local batch sizes differ
    (and, with ``extra``, when those further per-rank counts differ).

    Every rank takes part in the same all_gather and sees the same sizes, so
    they all raise together instead of hanging in a later collective.
    """
    world_size = dist.get_world_size(group)
    counts = [local_n] + list(extra or [])
    size = torch.tensor(counts, dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    sizes = [s.tolist() for s in sizes]
    batch = [s[0] for s in sizes]
    if len(set(batch)) != 1:
        raise ValueError(
            f"{what} needs the same local batch size on every rank, got "
            f"{batch} (rank: batch size); pad or drop the last partial batch"
        )
    if extra and len({tuple(s[1:]) for s in sizes}) != 1:
        raise ValueError(f"{what} needs the same number of negatives on every rank, got "
                         f"{[s[1:] for s in sizes]} (rank: counts)")


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
