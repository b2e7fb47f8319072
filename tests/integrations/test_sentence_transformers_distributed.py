"""clipfast's MultipleNegativesRankingLoss family with
``gather_across_devices=True`` on two gloo ranks equals sentence-transformers'
on the same two ranks: every rank's loss and gradients (w.r.t. its
embeddings, and w.r.t. a tiny model's parameters through the plain and the
cached classes), fp64 to 1e-10. The workers live in st_harness.py."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .st_harness import EMBEDDING_SCENARIOS, assert_equal_fp64, save_tiny_bert, worker

pytest.importorskip("sentence_transformers")

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

WORLD_SIZE, LOCAL_N, D = 2, 5, 6


def _spawned(rank, world_size, store, tmp_root, model_path):
    worker(rank, world_size, store, os.path.join(tmp_root, f"rank{rank}.pt"), model_path, LOCAL_N, D)


def _run(tmp_root: str):
    model_path = save_tiny_bert(os.path.join(tmp_root, "bert"), dim=D, dropout=0.1)
    store = os.path.join(tmp_root, "store")
    outs = [os.path.join(tmp_root, f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for path in [store, *outs]:
        if os.path.exists(path):
            os.remove(path)
    context = mp.start_processes(_spawned, args=(WORLD_SIZE, store, tmp_root, model_path),
                                 nprocs=WORLD_SIZE, start_method="spawn", join=False)
    while not context.join(timeout=300):
        pass
    reports = [torch.load(path, weights_only=False) for path in outs]
    errors = [f"rank {r}:\n{rep['error']}" for r, rep in enumerate(reports) if rep["error"]]
    assert not errors, "\n".join(errors)
    return [rep["results"] for rep in reports]


def test_gather_across_devices_matches_sentence_transformers(tmp_path):
    """One two-rank run (a single test, so pytest-xdist never starts it
    twice) covering every scenario of st_harness."""
    results = _run(str(tmp_path))
    names = [s[0] for s in EMBEDDING_SCENARIOS] + ["model_symmetric", "model_cached"]
    for name in names:
        for rank, per_rank in enumerate(results):
            theirs, ours = per_rank[name]["st"], per_rank[name]["ours"]
            assert len(ours) == len(theirs) and torch.isfinite(theirs[0]), (name, rank)
            try:
                assert_equal_fp64(ours, theirs)
            except AssertionError as err:
                raise AssertionError(f"{name}, rank {rank}: {err}") from err
        # The ranks see different anchors: different local losses.
        assert float(results[0][name]["st"][0]) != float(results[1][name]["st"][0]), name

    # Gathering is not a no-op: each rank's anchors also score the other
    # rank's documents, so the loss exceeds that of the local batch alone.
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    scenario = EMBEDDING_SCENARIOS[0]
    g = torch.Generator().manual_seed(len(scenario[0]))
    full = [torch.randn(LOCAL_N * WORLD_SIZE, D, generator=g, dtype=torch.float64)
            for _ in range(scenario[4])]
    local = MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(
        [t[:LOCAL_N] for t in full], None)
    assert float(results[0]["default"]["ours"][0]) > float(local)
