"""Worker side of the multi-process tests (imported by spawned processes).

Every worker always reaches the end: exceptions are caught and written to its
result file, the ranks meet at a barrier, and only then is the process group
destroyed, so gloo's teardown never races a rank that is still communicating.
A rank stuck in a collective because another failed times out (TIMEOUT) and
reports that instead of hanging the test run.
"""

from __future__ import annotations

import datetime
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clipfast import ClipLoss, SigLipLoss, info_nce_loss

TIMEOUT = datetime.timedelta(seconds=90)


@dataclass
class Problem:
    """A global batch produced by two linear 'encoders' shared by every rank."""

    image_inputs: torch.Tensor
    text_inputs: torch.Tensor
    image_weight: torch.Tensor
    text_weight: torch.Tensor
    log_scale: torch.Tensor
    bias: torch.Tensor


def make_problem(global_n: int, d_in: int = 7, d: int = 6, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    image_inputs = torch.randn(global_n, d_in, generator=g, dtype=torch.float64)
    text_inputs = image_inputs + 0.8 * torch.randn(global_n, d_in, generator=g, dtype=torch.float64)
    return Problem(
        image_inputs, text_inputs,
        torch.randn(d_in, d, generator=g, dtype=torch.float64),
        torch.randn(d_in, d, generator=g, dtype=torch.float64),
        torch.tensor(2.3, dtype=torch.float64),
        torch.tensor(-0.7, dtype=torch.float64),
    )


def loss_and_grads(problem: Problem, rows: slice, loss_fn, dtype=torch.float64):
    """Loss on the given rows and the gradients of the shared parameters."""
    params = [t.clone().to(dtype).requires_grad_() for t in (
        problem.image_weight, problem.text_weight, problem.log_scale, problem.bias)]
    image_weight, text_weight, log_scale, bias = params
    image_features = problem.image_inputs[rows].to(dtype) @ image_weight
    text_features = problem.text_inputs[rows].to(dtype) @ text_weight
    loss = loss_fn(image_features, text_features, log_scale.exp(), logit_bias=bias)
    loss.backward()
    return loss.detach(), [p.grad.detach() for p in params]


def info_nce_fn(rows: slice, negatives=None, labels=False, **kwargs):
    """``info_nce_loss`` on the rows ``rows`` of the global batch, with hard
    negatives made row by row from the texts (so the global batch's negatives
    are the ranks' concatenated) and group labels that span ranks."""
    def loss_fn(image_features, text_features, logit_scale, logit_bias=None):
        extra = None
        if negatives == "shared":
            extra = 0.6 * text_features.roll(1, dims=1) - 0.3 * image_features
        elif negatives == "per_query":
            extra = torch.stack([text_features.roll(1, dims=1), 0.5 * image_features.flip(1)], 1)
        ids = None
        if labels:  # pairs (0, 1), (2, 3), ... of the global batch: some span two ranks
            start = rows.start or 0
            ids = torch.arange(start, start + image_features.shape[0]) // 2
        return info_nce_loss(image_features, text_features, logit_scale, logit_bias=logit_bias,
                             negative_features=extra, labels=ids, **kwargs)

    return loss_fn


MISMATCH_MODES = {
    "gather": lambda rank, w: ClipLoss(rank=rank, world_size=w, gather_with_grad=True),
    "local": lambda rank, w: ClipLoss(rank=rank, world_size=w, gather_with_grad=True,
                                      local_loss=True),
    "ring": lambda rank, w: ClipLoss(rank=rank, world_size=w, ring=True),
    **{f"siglip_{impl}": (lambda impl: lambda rank, w: SigLipLoss(
        rank=rank, world_size=w, dist_impl=impl))(impl)
       for impl in ("bidir", "shift", "reduce", "gather")},
    "info_nce_gather": lambda rank, w: (
        lambda x, y, s: info_nce_loss(x, y, s, gather_across_devices=True, symmetric=True)),
}


def worker(rank: int, world_size: int, store_path: str, out_path: str, scenarios, local_n: int):
    results, error = {}, None
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size, timeout=TIMEOUT)
        problem = make_problem(local_n * world_size)
        rows = slice(rank * local_n, (rank + 1) * local_n)
        for name, kwargs, dtype in scenarios:
            kwargs = dict(kwargs)
            kind = kwargs.pop("loss", "clip")
            if kind == "info_nce":
                loss_fn = info_nce_fn(rows, gather_across_devices=True, **kwargs)
            else:
                module = SigLipLoss if kind == "siglip" else ClipLoss
                loss_fn = module(rank=rank, world_size=world_size, **kwargs)
            loss, grads = loss_and_grads(problem, rows, loss_fn, dtype)
            raw_grads = [grad.clone() for grad in grads]
            # What DistributedDataParallel does to replicated parameters.
            for grad in grads:
                dist.all_reduce(grad)
                grad /= world_size
            mean_loss = loss.clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world_size
            results[name] = dict(loss=loss, mean_loss=mean_loss, grads=grads, raw_grads=raw_grads)

        # Unequal local batches: every rank must raise, none may hang.
        uneven = slice(0, local_n + rank)
        try:
            loss_and_grads(problem, uneven, ClipLoss(rank=rank, world_size=world_size, ring=True))
            results["uneven"] = "no error"
        except ValueError as err:
            results["uneven"] = str(err)

        # Ranks that disagree on d or dtype: the same ValueError on every
        # rank, in every mode, before any collective of mismatched sizes.
        for mode_name, make in MISMATCH_MODES.items():
            for kind in ("d", "dtype"):
                d = 4 + (rank if kind == "d" else 0)
                dtype = torch.float32 if (kind == "dtype" and rank == 1) else torch.float64
                x = torch.randn(local_n, d, dtype=dtype)
                try:
                    make(rank, world_size)(x, x.flip(0), torch.tensor(2.0, dtype=torch.float64))
                    results[f"mismatch_{mode_name}_{kind}"] = "no error"
                except ValueError as err:
                    results[f"mismatch_{mode_name}_{kind}"] = str(err)

        # create_graph=True through the modes whose Functions compute
        # first-order gradients only: a clear error, never a silent zero.
        for mode in (dict(ring=True), dict(local_loss=True, gather_with_grad=True)):
            name = "double_backward_" + "_".join(sorted(mode))
            x = problem.image_inputs[rows].double().requires_grad_()
            y = problem.text_inputs[rows].double().requires_grad_()
            loss = ClipLoss(rank=rank, world_size=world_size, normalize=True, **mode)(
                x, y, torch.tensor(3.0, dtype=torch.float64))
            try:
                torch.autograd.grad(loss, x, create_graph=True)
                results[name] = "no error"
            except RuntimeError as err:
                results[name] = str(err)
    except BaseException:  # noqa: BLE001 - reported by the parent test
        error = traceback.format_exc()
    finally:
        torch.save({"results": results, "error": error}, out_path)
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
