"""Distributed modes on 2 and 3 CPU ranks (gloo): every exact mode's
DDP-averaged gradients equal the single-process gradients on the concatenated
batch; the scaled mode is scaled exactly as documented."""

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipfast import clip_loss

from .distributed_harness import loss_and_grads, make_problem, worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

LOCAL_N = 5
SCENARIOS = [
    # name, ClipLoss kwargs, dtype
    ("gather_with_grad", dict(gather_with_grad=True, normalize=True), torch.float64),
    ("gather_with_grad_local", dict(gather_with_grad=True, local_loss=True, normalize=True), torch.float64),
    ("gather_no_grad", dict(normalize=True), torch.float64),
    ("gather_no_grad_local", dict(local_loss=True, normalize=True), torch.float64),
    ("ring", dict(ring=True, normalize=True), torch.float64),
    ("ring_fp32", dict(ring=True, normalize=True), torch.float32),
    ("ring_unnormalized", dict(ring=True, normalize=False), torch.float64),
    ("gather_with_grad_triton", dict(gather_with_grad=True, backend="triton", normalize=True),
     torch.float32),
    ("gather_with_grad_local_triton",
     dict(gather_with_grad=True, local_loss=True, backend="triton", normalize=True), torch.float32),
    ("ring_triton", dict(ring=True, backend="triton", normalize=True), torch.float32),
    ("gather_with_grad_hybrid", dict(gather_with_grad=True, backend="hybrid", normalize=True),
     torch.float32),
    ("gather_with_grad_local_hybrid",
     dict(gather_with_grad=True, local_loss=True, backend="hybrid", normalize=True), torch.float32),
    ("ring_hybrid", dict(ring=True, backend="hybrid", normalize=True), torch.float32),
    ("siglip_bidir_hybrid", dict(loss="siglip", dist_impl="bidir", normalize=True,
                                 backend="hybrid"), torch.float32),
    # SigLIP: open_clip's four ways of bringing the other ranks' texts over.
    ("siglip_bidir", dict(loss="siglip", dist_impl="bidir", normalize=True), torch.float64),
    ("siglip_shift", dict(loss="siglip", dist_impl="shift", normalize=True), torch.float64),
    ("siglip_reduce", dict(loss="siglip", dist_impl="reduce", normalize=True), torch.float64),
    ("siglip_gather", dict(loss="siglip", dist_impl="gather", normalize=False), torch.float64),
    ("siglip_bidir_chunked_fp32", dict(loss="siglip", dist_impl="bidir", normalize=True,
                                       backend="chunked"), torch.float32),
    # info_nce_loss(gather_across_devices=True): sentence-transformers' gather.
    ("info_nce_rows", dict(loss="info_nce", backend="chunked"), torch.float64),
    ("info_nce_symmetric", dict(loss="info_nce", symmetric=True, backend="reference"),
     torch.float64),
    ("info_nce_shared_negatives", dict(loss="info_nce", negatives="shared", backend="chunked"),
     torch.float64),
    ("info_nce_per_query_negatives_symmetric",
     dict(loss="info_nce", negatives="per_query", symmetric=True, backend="chunked"),
     torch.float64),
    ("info_nce_labels_smoothing",
     dict(loss="info_nce", labels=True, label_smoothing=0.1, symmetric=True,
          negatives="shared", backend="chunked"), torch.float64),
    ("info_nce_unnormalized_triton", dict(loss="info_nce", normalize=False, backend="triton",
                                          negatives="shared"), torch.float32),
    ("info_nce_hybrid", dict(loss="info_nce", symmetric=True, backend="hybrid"), torch.float32),
    ("gather_with_grad_local_ieee",
     dict(gather_with_grad=True, local_loss=True, backend="triton", normalize=True,
          allow_tf32=False), torch.float32),
]


@functools.lru_cache(maxsize=None)
def _run(world_size: int, tmp_root: str):
    os.makedirs(tmp_root, exist_ok=True)
    store = os.path.join(tmp_root, f"store_{world_size}")
    outs = [os.path.join(tmp_root, f"rank{r}_of_{world_size}.pt") for r in range(world_size)]
    for path in [store, *outs]:
        if os.path.exists(path):
            os.remove(path)

    context = mp.start_processes(
        _spawned, args=(world_size, store, tmp_root), nprocs=world_size, start_method="spawn",
        join=False)
    while not context.join(timeout=300):
        pass
    reports = [torch.load(path, weights_only=False) for path in outs]
    errors = [f"rank {r}:\n{rep['error']}" for r, rep in enumerate(reports) if rep["error"]]
    assert not errors, "\n".join(errors)
    return [rep["results"] for rep in reports]


def _spawned(rank, world_size, store, tmp_root):
    worker(rank, world_size, store, os.path.join(tmp_root, f"rank{rank}_of_{world_size}.pt"),
           SCENARIOS, LOCAL_N)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dist"))


def _single_process(world_size, dtype, normalize=True):
    problem = make_problem(LOCAL_N * world_size)
    fn = functools.partial(clip_loss, backend="reference", normalize=normalize)
    return loss_and_grads(problem, slice(None), fn, dtype)


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)


def _assert_mean_loss_and_ddp_grads(results, name, want_loss, want_grads, dtype):
    """Every rank: the mean of the ranks' losses and the DDP-averaged
    gradients equal the single-process ones."""
    for rank, per_rank in enumerate(results):
        got = per_rank[name]
        torch.testing.assert_close(got["mean_loss"], want_loss, **_tol(dtype))
        for label, g, w in zip(["image_weight", "text_weight", "log_scale", "bias"],
                               got["grads"], want_grads):
            torch.testing.assert_close(g, w, **_tol(dtype), msg=lambda m: f"rank {rank} {label}: {m}")


EXACT = [s for s in SCENARIOS
         if not s[0].startswith(("gather_no_grad", "siglip", "info_nce"))]
INFO_NCE = [s for s in SCENARIOS if s[0].startswith("info_nce")]
SIGLIP = [s for s in SCENARIOS if s[0].startswith("siglip")]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name,kwargs,dtype", EXACT, ids=[s[0] for s in EXACT])
def test_exact_modes_match_the_concatenated_batch(world_size, name, kwargs, dtype, tmp_root):
    results = _run(world_size, tmp_root)
    want_loss, want_grads = _single_process(world_size, dtype, kwargs.get("normalize", True))
    for rank, per_rank in enumerate(results):
        got = per_rank[name]
        if kwargs.get("local_loss"):
            # Each rank's loss is its own rows' share; their mean is the loss.
            torch.testing.assert_close(got["mean_loss"], want_loss, **_tol(dtype))
        else:
            torch.testing.assert_close(got["loss"], want_loss, **_tol(dtype))
        for label, g, w in zip(["image_weight", "text_weight", "log_scale", "bias"],
                               got["grads"], want_grads):
            torch.testing.assert_close(g, w, **_tol(dtype), msg=lambda m: f"rank {rank} {label}: {m}")


@pytest.mark.parametrize("world_size", [2, 3])
def test_gather_without_grad_scales_feature_gradients_by_one_over_world_size(world_size, tmp_root):
    results = _run(world_size, tmp_root)
    want_loss, want_grads = _single_process(world_size, torch.float64)
    got = results[0]["gather_no_grad"]
    torch.testing.assert_close(got["loss"], want_loss, **_tol(torch.float64))
    torch.testing.assert_close(got["grads"][0], want_grads[0] / world_size, **_tol(torch.float64))
    torch.testing.assert_close(got["grads"][1], want_grads[1] / world_size, **_tol(torch.float64))
    # The replicated scale sees the full loss on every rank: exact.
    torch.testing.assert_close(got["grads"][2], want_grads[2], **_tol(torch.float64))


@pytest.mark.parametrize("world_size", [2, 3])
def test_unequal_batches_raise_on_every_rank(world_size, tmp_root):
    results = _run(world_size, tmp_root)
    for per_rank in results:
        assert "same local batch size" in per_rank["uneven"], per_rank["uneven"]
        assert str([LOCAL_N + r for r in range(world_size)]) in per_rank["uneven"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_local_loss_without_gather_grad_is_wrong_as_documented(world_size, tmp_root):
    # The loss and the replicated scale's gradient are right; the encoders miss
    # the gradient of the other ranks' losses, so they must differ.
    results = _run(world_size, tmp_root)
    want_loss, want_grads = _single_process(world_size, torch.float64)
    got = results[0]["gather_no_grad_local"]
    torch.testing.assert_close(got["mean_loss"], want_loss, **_tol(torch.float64))
    torch.testing.assert_close(got["grads"][2], want_grads[2], **_tol(torch.float64))
    for g, w in zip(got["grads"][:2], want_grads[:2]):
        assert not torch.allclose(g, w, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("world_size", [2])
def test_double_backward_is_refused_clearly(world_size, tmp_root):
    results = _run(world_size, tmp_root)
    for per_rank in results:
        for key in ("double_backward_ring", "double_backward_gather_with_grad_local_loss"):
            assert "does not support double backward" in per_rank[key], per_rank[key]
            assert "clip_loss" in per_rank[key], per_rank[key]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name,kwargs,dtype", SIGLIP, ids=[s[0] for s in SIGLIP])
def test_siglip_modes_match_the_concatenated_batch(world_size, name, kwargs, dtype, tmp_root):
    # Each rank's loss covers its images against every rank's texts, divided
    # by its local N: their mean is the single-process loss of the whole
    # batch, and DDP's averaged gradients are that loss's gradients.
    from clipfast.backends.reference import reference_siglip_loss

    results = _run(world_size, tmp_root)
    problem = make_problem(LOCAL_N * world_size)
    want_loss, want_grads = loss_and_grads(
        problem, slice(None), functools.partial(reference_siglip_loss,
                                                normalize=kwargs["normalize"]), dtype)
    _assert_mean_loss_and_ddp_grads(results, name, want_loss, want_grads, dtype)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_gives_every_rank_the_scale_gradient_of_open_clips_gather_mode(world_size, tmp_root):
    # open_clip's gather mode computes the global loss on every rank, so each
    # rank's logit_scale gradient is the whole gradient; the ring's must be
    # the same rank by rank, not only after DDP's averaging.
    results = _run(world_size, tmp_root)
    _, want_grads = _single_process(world_size, torch.float64)
    for rank, per_rank in enumerate(results):
        ring = per_rank["ring"]["raw_grads"][2]
        torch.testing.assert_close(ring, per_rank["gather_with_grad"]["raw_grads"][2],
                                   **_tol(torch.float64), msg=lambda m: f"rank {rank}: {m}")
        torch.testing.assert_close(ring, want_grads[2], **_tol(torch.float64))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name,kwargs,dtype", INFO_NCE, ids=[s[0] for s in INFO_NCE])
def test_info_nce_gather_across_devices_matches_the_concatenated_batch(world_size, name, kwargs,
                                                                       dtype, tmp_root):
    # Each rank's loss is its queries' mean against every rank's keys: their
    # mean is the single-process loss of the whole batch, and DDP's averaged
    # gradients are its gradients (labels grouping pairs across ranks too).
    from .distributed_harness import info_nce_fn

    results = _run(world_size, tmp_root)
    options = {k: v for k, v in kwargs.items() if k not in ("loss", "backend")}
    problem = make_problem(LOCAL_N * world_size)
    want_loss, want_grads = loss_and_grads(
        problem, slice(None), info_nce_fn(slice(None), backend="reference", **options), dtype)
    _assert_mean_loss_and_ddp_grads(results, name, want_loss, want_grads, dtype)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("kind,field,shown", [
    ("d", "embedding dim d of image/query features", "[4, 5"),
    ("dtype", "dtype of image/query features", "['float64', 'float32'"),
])
def test_ranks_that_disagree_get_the_same_clear_error_in_every_mode(world_size, kind, field,
                                                                   shown, tmp_root):
    from .distributed_harness import MISMATCH_MODES

    results = _run(world_size, tmp_root)
    for mode in MISMATCH_MODES:
        messages = {per_rank[f"mismatch_{mode}_{kind}"] for per_rank in results}
        assert len(messages) == 1, (mode, messages)  # every rank, the same words
        message = messages.pop()
        assert field in message and shown in message and "listed by rank" in message, \
            (mode, message)
